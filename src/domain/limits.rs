//! Request limits: every bound on untrusted input, enforced at the edge with errors that name the
//! field and the limit. Configured under `[limits]` (see `tagllm.example.toml`).

use serde::{Deserialize, Serialize};

/// Request limits, enforced at the edge with errors that name the field and the limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest note id (bytes).
    pub max_note_id_bytes: usize,
    /// Longest category key (bytes).
    pub max_category_bytes: usize,
    /// Longest title (characters).
    pub max_title_chars: usize,
    /// Longest body (characters).
    pub max_body_chars: usize,
    /// Most images per note.
    pub max_images: usize,
    /// Largest inline image (bytes).
    pub max_image_bytes: usize,
    /// Longest image URI (bytes).
    pub max_image_uri_bytes: usize,
    /// Most pixels (width x height) of a decoded inline image; checked from the header, before
    /// any pixel memory is allocated, so a decompression bomb costs nothing.
    pub max_image_pixels: u64,
    /// Longest side of an inline image (pixels).
    pub max_image_side: u32,
    /// Most note ids per GetNoteFeatures call.
    pub max_ids_per_request: usize,
    /// Most tags kept per dimension of a note.
    pub max_tags_per_dimension: usize,
    /// Most tags kept per note.
    pub max_tags_per_note: usize,
    /// Longest tag value kept (characters, after normalization).
    pub max_tag_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_note_id_bytes: 128,
            max_category_bytes: 64,
            max_title_chars: 512,
            max_body_chars: 8192,
            max_images: 9,
            max_image_bytes: 8 << 20,
            max_image_uri_bytes: 2048,
            max_image_pixels: 24_000_000,
            max_image_side: 16_384,
            max_ids_per_request: 5000,
            max_tags_per_dimension: 3,
            max_tags_per_note: 24,
            max_tag_chars: 24,
        }
    }
}
