//! Plain domain types and pure logic: notes, ids, tags, request limits, tag normalization and
//! canonical values, the domain error, and the validation that turns untrusted input into them. The bottom layer: it
//! names nothing else of the crate, and knows nothing of gRPC or the model.

pub mod canonical;
pub mod error;
mod limits;
mod normalize;

pub use limits::Limits;
pub use normalize::normalize;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use error::{Error, Result};

/// Whether `key` is a valid category or dimension key: `^[a-z][a-z0-9_]{0,31}$`.
pub fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some('a'..='z'))
        && key.len() <= 32
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// A validated note id: 1..=`max_note_id_bytes` bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NoteId(String);

impl NoteId {
    /// Validates `raw` as the note id found in request field `field`.
    pub fn parse(raw: &str, field: &str, limits: &Limits) -> Result<NoteId> {
        NoteId::check(raw, limits).map_err(|reason| Error::invalid(field, reason))?;
        Ok(NoteId(raw.to_string()))
    }

    /// Checks `raw` without allocating (the batch-read hot path); `Err` holds the reason.
    pub fn check(raw: &str, limits: &Limits) -> Result<(), String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.len() > limits.max_note_id_bytes {
            return Err(format!(
                "is {} bytes, over the limit of {}",
                raw.len(),
                limits.max_note_id_bytes
            ));
        }
        // The same test as `chars().any(char::is_control)`, without decoding ASCII ids (nearly
        // all) character by character.
        let control = if raw.is_ascii() {
            raw.bytes().any(|b| b.is_ascii_control())
        } else {
            raw.chars().any(char::is_control)
        };
        if control {
            return Err("must not contain control characters".into());
        }
        Ok(())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NoteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One image of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// Inline encoded bytes (JPEG, PNG, WebP, GIF).
    Bytes(Vec<u8>),
    /// A URI; the server never fetches it (no network at run time), text-only models ignore it.
    Uri(String),
}

/// A validated note, ready to be tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The caller's id.
    pub id: NoteId,
    /// Category key as sent (resolved against the handbook later; unknown keys use the fallback).
    pub category: String,
    /// Title, trimmed.
    pub title: String,
    /// Body, trimmed.
    pub body: String,
    /// Images in order.
    pub images: Vec<ImageRef>,
    /// Last edit time (ms since the epoch), informational.
    pub updated_at_ms: i64,
}

/// Untrusted note fields as they arrive, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawNote {
    /// See [`Note::id`].
    pub note_id: String,
    /// See [`Note::category`].
    pub category: String,
    /// See [`Note::title`].
    pub title: String,
    /// See [`Note::body`].
    pub body: String,
    /// Inline images (decoded bytes) or URIs.
    #[serde(skip)]
    pub images: Vec<ImageRef>,
    /// Image URIs, for JSON input (`tagllm tag note.json`).
    #[serde(rename = "images")]
    pub image_uris: Vec<String>,
    /// See [`Note::updated_at_ms`].
    pub updated_at_ms: i64,
}

impl RawNote {
    /// The JSON names of a note's fields (`deny_unknown_fields` refuses any other).
    pub const JSON_FIELDS: [&'static str; 6] = [
        "note_id",
        "category",
        "title",
        "body",
        "images",
        "updated_at_ms",
    ];

    /// A note from a JSON object that may carry other fields beside the note's (a JSONL line of
    /// teacher records or evaluation data: `lang`, `teacher`, `injection`, ...): those are
    /// dropped, the note's own are parsed as [`RawNote`].
    pub fn from_json_fields(
        mut fields: serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Result<RawNote> {
        fields.retain(|k, _| Self::JSON_FIELDS.contains(&k.as_str()));
        serde_json::from_value(serde_json::Value::Object(fields))
    }
}

fn check_text(field: &str, text: &str, max_chars: usize) -> Result<String> {
    let n = text.chars().count();
    if n > max_chars {
        return Err(Error::invalid(
            field,
            format!("is {n} characters, over the limit of {max_chars}"),
        ));
    }
    // Newlines and tabs are fine in prose; other control characters are not text.
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(text.trim().to_string())
}

impl RawNote {
    /// Validates every field against `limits`, naming the first offending field (`note.<field>`).
    pub fn validate(self, limits: &Limits) -> Result<Note> {
        let id = NoteId::parse(&self.note_id, "note.note_id", limits)?;
        let category = self.category.trim();
        if category.len() > limits.max_category_bytes {
            return Err(Error::invalid(
                "note.category",
                format!(
                    "is {} bytes, over the limit of {}",
                    category.len(),
                    limits.max_category_bytes
                ),
            ));
        }
        if category.chars().any(char::is_control) {
            return Err(Error::invalid(
                "note.category",
                "must not contain control characters",
            ));
        }
        let title = check_text("note.title", &self.title, limits.max_title_chars)?;
        let body = check_text("note.body", &self.body, limits.max_body_chars)?;
        if title.is_empty() && body.is_empty() {
            return Err(Error::invalid(
                "note.body",
                "title and body are both empty: nothing to tag",
            ));
        }
        let mut images = self.images;
        images.extend(self.image_uris.into_iter().map(ImageRef::Uri));
        if images.len() > limits.max_images {
            return Err(Error::invalid(
                "note.images",
                format!(
                    "has {} images, over the limit of {}",
                    images.len(),
                    limits.max_images
                ),
            ));
        }
        for (i, img) in images.iter().enumerate() {
            match img {
                ImageRef::Bytes(b) if b.is_empty() => {
                    return Err(Error::invalid(format!("note.images[{i}].data"), "is empty"))
                }
                ImageRef::Bytes(b) if b.len() > limits.max_image_bytes => {
                    return Err(Error::invalid(
                        format!("note.images[{i}].data"),
                        format!(
                            "is {} bytes, over the limit of {}",
                            b.len(),
                            limits.max_image_bytes
                        ),
                    ))
                }
                ImageRef::Uri(u) if u.is_empty() || u.len() > limits.max_image_uri_bytes => {
                    return Err(Error::invalid(
                        format!("note.images[{i}].uri"),
                        format!(
                            "must be 1..={} bytes, got {}",
                            limits.max_image_uri_bytes,
                            u.len()
                        ),
                    ))
                }
                _ => {}
            }
        }
        Ok(Note {
            id,
            category: category.to_string(),
            title,
            body,
            images,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

impl Note {
    /// SHA-256 (hex) of everything the model reads: category, title, body, images. Length-prefixed
    /// fields, so no two different notes share a preimage.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tagllm-note-v1");
        for part in [
            self.category.as_bytes(),
            self.title.as_bytes(),
            self.body.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for img in &self.images {
            let (kind, bytes): (u8, &[u8]) = match img {
                ImageRef::Bytes(b) => (0, b),
                ImageRef::Uri(u) => (1, u.as_bytes()),
            };
            h.update([kind]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        hex::encode(h.finalize())
    }
}

/// A generated tag: a handbook dimension and a normalized value, with a score in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tag {
    /// Dimension key from the handbook.
    pub dimension: String,
    /// Normalized value (see [`normalize`]).
    pub value: String,
    /// Confidence; 1.0 while the decoder does not score tags.
    pub score: f32,
}

/// The versions that produced a result; together with the content hash they are the idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Versions {
    /// Model id: file name, weight digest and prompt version.
    pub model: String,
    /// Handbook `version`.
    pub handbook: String,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_id_control_characters_are_refused_ascii_or_not() {
        let l = Limits::default();
        for (id, ok) in [
            ("note-0001", true),
            ("caf\u{e9}-\u{1F600}", true),
            ("a\u{0}b", false),
            ("tab\tid", false),
            ("del\u{7f}", false),
            // C1 controls exist only outside ASCII.
            ("x\u{85}y", false),
            ("\u{e9}\u{9f}", false),
            ("\u{e9}\u{a0}", true),
        ] {
            assert_eq!(NoteId::check(id, &l).is_ok(), ok, "{id:?}");
            assert_eq!(ok, !id.chars().any(char::is_control), "{id:?}");
        }
    }

    #[test]
    fn json_fields_beside_the_note_are_dropped_the_notes_own_parsed() {
        let line = r#"{"note_id": "n1", "category": "food", "body": "b", "images": ["x.png"],
            "updated_at_ms": 5, "lang": "en", "teacher": {"tags": {}}, "injection": true}"#;
        let raw = RawNote::from_json_fields(serde_json::from_str(line).unwrap()).unwrap();
        assert_eq!(
            (raw.note_id.as_str(), raw.category.as_str()),
            ("n1", "food")
        );
        assert_eq!((raw.body.as_str(), raw.updated_at_ms), ("b", 5));
        assert_eq!(raw.image_uris, ["x.png"]);
        // A note field of the wrong type is still an error.
        let bad = r#"{"note_id": 7, "lang": "en"}"#;
        assert!(RawNote::from_json_fields(serde_json::from_str(bad).unwrap()).is_err());
    }

    fn raw(id: &str, body: &str) -> RawNote {
        RawNote {
            note_id: id.into(),
            category: "sneakers".into(),
            body: body.into(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_fields_and_limits() {
        let l = Limits::default();
        let e = raw("", "x").validate(&l).unwrap_err().to_string();
        assert!(e.starts_with("note.note_id"), "{e}");
        let e = raw(&"a".repeat(129), "x")
            .validate(&l)
            .unwrap_err()
            .to_string();
        assert!(e.contains("128"), "{e}");
        let e = raw("n", &"字".repeat(8193))
            .validate(&l)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("note.body") && e.contains("8192"), "{e}");
        let e = raw("n", "a\u{0}b").validate(&l).unwrap_err().to_string();
        assert!(e.contains("control"), "{e}");
        let e = raw("n", "  ").validate(&l).unwrap_err().to_string();
        assert!(e.contains("nothing to tag"), "{e}");
        assert!(raw("n", "line\nline\ttab").validate(&l).is_ok());
    }

    #[test]
    fn content_hash_covers_every_field() {
        let l = Limits::default();
        let a = raw("n", "body").validate(&l).unwrap();
        let mut b = a.clone();
        b.id = NoteId::parse("other", "f", &l).unwrap();
        assert_eq!(a.content_hash(), b.content_hash(), "the id is not content");
        b.category = "beauty".into();
        assert_ne!(a.content_hash(), b.content_hash());
        let mut c = a.clone();
        c.images.push(ImageRef::Bytes(vec![1, 2, 3]));
        assert_ne!(a.content_hash(), c.content_hash());
        // Field boundaries are unambiguous.
        let mut d = a.clone();
        d.title = "bo".into();
        d.body = "dy".into();
        let mut e = a.clone();
        e.title = "bod".into();
        e.body = "y".into();
        assert_ne!(d.content_hash(), e.content_hash());
    }
}
