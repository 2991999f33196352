//! `tagllm.v1.GetNoteFeaturesResponse`, written by hand instead of generated, so the server can
//! send notes it encoded once.
//!
//! The ranking-time read answers hundreds of notes per call, and almost every call asks for the
//! same form of a note (all feature groups, no tags). Building each note's protobuf message (a map
//! with a string key and two vectors per group) and encoding it again on every call was most of
//! the call's cost. A `repeated NoteFeatures notes = 1` field is, on the wire, just each note's
//! encoded message behind a key and a length, so the server keeps every cached note's encoding
//! and writes those bytes as they are (`encoded_notes`). Decoding is unchanged: clients get
//! `notes` as before, and the wire format is exactly the generated type's (tested below).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use prost::{
    encoding::{self, DecodeContext, WireType},
    DecodeError, Message,
};

use super::pb;
use crate::store::CachedNote;

/// `tagllm.v1.GetNoteFeaturesResponse` (see the module docs).
#[derive(Clone, Default, PartialEq, Debug)]
pub struct GetNoteFeaturesResponse {
    /// LAYOUT_NOTE_MAJOR: one entry per requested id, in order.
    pub notes: Vec<pb::NoteFeatures>,
    /// LAYOUT_JAGGED.
    pub jagged: Option<pb::JaggedFeatures>,
    /// Server side only: notes already encoded as `NoteFeatures` messages. They go on the wire as
    /// field 1 before `notes`; a server fills one of the two, never both. Decoding never fills it.
    pub encoded_notes: Vec<Encoded>,
}

/// One note's encoded `NoteFeatures` message.
#[derive(Clone, Debug)]
pub struct Encoded(Repr);

#[derive(Clone, Debug)]
enum Repr {
    /// The encoding a cached note keeps (`CachedNote::wire`, set by [`Encoded::cached`], the only
    /// maker). Holding the note, which the read already holds, costs no reference counting.
    Cached(Arc<CachedNote>),
    /// Encoded for this answer.
    Bytes(Bytes),
}

impl PartialEq for Encoded {
    fn eq(&self, other: &Encoded) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Encoded {
    /// A cached note's kept encoding, made on first use.
    pub fn cached(note: Arc<CachedNote>, encode: impl FnOnce(&CachedNote) -> Bytes) -> Encoded {
        note.wire.get_or_init(|| encode(&note));
        Encoded(Repr::Cached(note))
    }

    /// A message encoded for this answer.
    pub fn bytes(b: Bytes) -> Encoded {
        Encoded(Repr::Bytes(b))
    }

    /// The message's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            // `cached` set it, and a OnceLock is never unset.
            Repr::Cached(n) => n.wire.get().map_or(&[], |b| &b[..]),
            Repr::Bytes(b) => b,
        }
    }
}

const NOTES: u32 = 1;
const JAGGED: u32 = 2;

impl Message for GetNoteFeaturesResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for b in &self.encoded_notes {
            let b = b.as_bytes();
            encoding::encode_key(NOTES, WireType::LengthDelimited, buf);
            encoding::encode_varint(b.len() as u64, buf);
            buf.put_slice(b);
        }
        for m in &self.notes {
            encoding::message::encode(NOTES, m, buf);
        }
        if let Some(j) = &self.jagged {
            encoding::message::encode(JAGGED, j, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            NOTES => encoding::message::merge_repeated(wire_type, &mut self.notes, buf, ctx),
            JAGGED => encoding::message::merge(
                wire_type,
                self.jagged.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let key = encoding::key_len(NOTES);
        self.encoded_notes
            .iter()
            .map(|b| b.as_bytes().len())
            .map(|n| key + encoding::encoded_len_varint(n as u64) + n)
            .sum::<usize>()
            + encoding::message::encoded_len_repeated(NOTES, &self.notes)
            + self
                .jagged
                .as_ref()
                .map_or(0, |j| encoding::message::encoded_len(JAGGED, j))
    }

    fn clear(&mut self) {
        self.notes.clear();
        self.jagged = None;
        self.encoded_notes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(id: &str, ids: Vec<i64>) -> pb::NoteFeatures {
        pb::NoteFeatures {
            note_id: id.into(),
            found: true,
            groups: [(
                "topic".to_string(),
                pb::SparseFeature {
                    weights: vec![1.0; ids.len()],
                    ids,
                },
            )]
            .into_iter()
            .collect(),
            tagged_at_ms: 7,
            category: "food".into(),
            ..Default::default()
        }
    }

    /// What prost-build generates for the message in `tagllm.proto`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(message, repeated, tag = "1")]
        notes: Vec<pb::NoteFeatures>,
        #[prost(message, optional, tag = "2")]
        jagged: Option<pb::JaggedFeatures>,
    }

    /// Pre-encoded notes, messages and the jagged layout all give the bytes the generated message
    /// holding the same notes gives, and decode back to them.
    #[test]
    fn pre_encoded_notes_are_the_same_wire_format() {
        let a = note("a", vec![1, -2, i64::MAX]);
        let b = note("b", vec![]);
        let plain = GetNoteFeaturesResponse {
            notes: vec![a.clone(), b.clone()],
            ..Default::default()
        };
        let pre = GetNoteFeaturesResponse {
            encoded_notes: vec![
                Encoded::bytes(a.encode_to_vec().into()),
                Encoded::bytes(b.encode_to_vec().into()),
            ],
            ..Default::default()
        };
        let bytes = Generated {
            notes: vec![a.clone(), b.clone()],
            jagged: None,
        }
        .encode_to_vec();
        assert_eq!(plain.encode_to_vec(), bytes);
        assert_eq!(pre.encode_to_vec(), bytes);
        assert_eq!(pre.encoded_len(), bytes.len());
        let back = GetNoteFeaturesResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, plain);
        assert!(back.encoded_notes.is_empty());

        let jagged = GetNoteFeaturesResponse {
            jagged: Some(pb::JaggedFeatures {
                note_ids: vec!["a".into()],
                found: vec![true],
                groups: vec![],
            }),
            ..Default::default()
        };
        let bytes = jagged.encode_to_vec();
        let generated = Generated {
            notes: vec![],
            jagged: jagged.jagged.clone(),
        };
        assert_eq!(generated.encode_to_vec(), bytes);
        assert_eq!(jagged.encoded_len(), bytes.len());
        assert_eq!(
            GetNoteFeaturesResponse::decode(bytes.as_slice()).unwrap(),
            jagged
        );
    }
}
