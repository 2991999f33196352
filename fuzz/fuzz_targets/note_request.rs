//! Request validation: any bytes as a TagNoteRequest, through the edge checks (fields, limits,
//! images). Nothing may panic; a note that passes must satisfy the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tagllm::{domain::Limits, grpc::pb};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::TagNoteRequest::decode(data) else {
        return;
    };
    // Small image limits keep each run fast; the logic is the same.
    let limits = Limits {
        max_image_pixels: 1 << 16,
        max_image_side: 1024,
        ..Limits::default()
    };
    if let Ok(note) = tagllm::grpc::note_from_proto(req.note, &limits) {
        assert!(note.id.as_str().len() <= limits.max_note_id_bytes);
        assert!(note.body.chars().count() <= limits.max_body_chars);
        assert!(note.images.len() <= limits.max_images);
        let _ = tagllm::tagging::images::check_note(&note, &limits);
    }
});
