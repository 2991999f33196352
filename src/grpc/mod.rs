//! The gRPC layer: generated code, the two services, proto <-> domain conversion and the one
//! `Error -> Status` mapping. Thin by design: validate, convert, call the domain, convert back.

pub mod auth;
pub mod codec;
mod feature_service;
mod size_status;
mod tag_service;
mod wire;

pub use feature_service::{FeatureApi, ModelVersion};
pub use size_status::SizeStatusLayer;
pub use tag_service::TagApi;

use crate::{
    domain::error::Error,
    domain::Limits,
    domain::{ImageRef, Note, RawNote},
    features::Schema,
    store::CachedNote,
};

/// Generated messages and services of `tagllm.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("tagllm.v1");
    pub use super::wire::GetNoteFeaturesResponse;
    /// Encoded descriptor set of `tagllm.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tagllm_descriptor.bin"));
}

/// Full gRPC name of the tagging service (health checks use it).
pub const TAG_SERVICE: &str = "tagllm.v1.TagService";
/// Full gRPC name of the feature service.
pub const FEATURE_SERVICE: &str = "tagllm.v1.FeatureService";

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(e.to_string()),
            Error::Unavailable(m) => tonic::Status::unavailable(m),
            Error::Overloaded {
                message,
                retry_after_ms,
            } => {
                // gRPC's own pushback header: clients with a retry policy wait this long.
                let mut st = tonic::Status::resource_exhausted(message);
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    st.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                st
            }
            Error::Cancelled => tonic::Status::cancelled("cancelled"),
            Error::Internal(cause) => {
                // The cause stays in the logs; clients get no internals.
                tracing::error!(%cause, "internal error");
                tonic::Status::internal("internal error (see server logs)")
            }
        }
    }
}

/// Converts and validates a proto note.
pub fn note_from_proto(note: Option<pb::Note>, limits: &Limits) -> Result<Note, Error> {
    let n = note.ok_or_else(|| Error::invalid("note", "is required"))?;
    let mut images = Vec::with_capacity(n.images.len());
    // Check the count before touching image contents.
    if n.images.len() > limits.max_images {
        return Err(Error::invalid(
            "note.images",
            format!(
                "has {} images, over the limit of {}",
                n.images.len(),
                limits.max_images
            ),
        ));
    }
    for (i, img) in n.images.into_iter().enumerate() {
        images.push(match img.source {
            Some(pb::image::Source::Data(d)) => ImageRef::Bytes(d),
            Some(pb::image::Source::Uri(u)) => ImageRef::Uri(u),
            None => {
                return Err(Error::invalid(
                    format!("note.images[{i}]"),
                    "has neither data nor uri",
                ))
            }
        });
    }
    RawNote {
        note_id: n.note_id,
        category: n.category,
        title: n.title,
        body: n.body,
        images,
        image_uris: Vec::new(),
        updated_at_ms: n.updated_at_ms,
    }
    .validate(limits)
}

fn tag_to_proto(t: &crate::domain::Tag) -> pb::Tag {
    pb::Tag {
        dimension: t.dimension.clone(),
        value: t.value.clone(),
        score: t.score,
    }
}

/// The inverse of `tag_to_proto` (a replica reading its primary's tags).
pub fn tag_from_proto(t: pb::Tag) -> crate::domain::Tag {
    crate::domain::Tag {
        dimension: t.dimension,
        value: t.value,
        score: t.score,
    }
}

/// Proto features of a stored note, restricted to `groups` (indices into the schema).
pub fn note_features_to_proto(
    e: &CachedNote,
    schema: &Schema,
    groups: &[usize],
    include_tags: bool,
) -> pb::NoteFeatures {
    pb::NoteFeatures {
        note_id: e.record.note_id.clone(),
        found: true,
        groups: groups
            .iter()
            .map(|&g| {
                let f = &e.features[g];
                (
                    schema.groups[g].name.clone(),
                    pb::SparseFeature {
                        ids: f.ids.clone(),
                        weights: f.weights.clone(),
                    },
                )
            })
            .collect(),
        tags: if include_tags {
            e.record.tags.iter().map(tag_to_proto).collect()
        } else {
            Vec::new()
        },
        tagged_at_ms: e.record.tagged_at_ms,
        versions: Some(pb::Versions {
            model: e.record.versions.model.clone(),
            handbook: e.record.versions.handbook.clone(),
            schema: schema.version.clone(),
        }),
        category: e.record.category.clone(),
    }
}

/// Resolves a `groups` filter to schema indices (all groups when empty).
pub fn select_groups(schema: &Schema, names: &[String]) -> Result<Vec<usize>, Error> {
    if names.is_empty() {
        return Ok((0..schema.groups.len()).collect());
    }
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            schema.group_index(n).ok_or_else(|| {
                let known: Vec<&str> = schema.groups.iter().map(|g| g.name.as_str()).collect();
                Error::invalid(
                    format!("groups[{i}]"),
                    format!("unknown feature group {n:?}; known: {}", known.join(", ")),
                )
            })
        })
        .collect()
}
