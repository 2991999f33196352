//! The model-output parser: any text as a model's answer for every handbook category. Nothing
//! may panic, and whatever it keeps must obey the handbook and the limits.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tagllm::{domain::Limits, tagging::handbook::Handbook, tagging::tags::parse_output};

fn handbook() -> &'static Handbook {
    static H: OnceLock<Handbook> = OnceLock::new();
    H.get_or_init(|| {
        Handbook::parse(include_str!("../../models/handbook.toml"), "handbook.toml").unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let limits = Limits::default();
    let h = handbook();
    for category in std::iter::once(&h.fallback).chain(&h.categories) {
        let parsed = parse_output(&text, category, &limits);
        assert!(parsed.tags.len() <= limits.max_tags_per_note);
        for t in &parsed.tags {
            assert!(category.has_dimension(&t.dimension), "{}", t.dimension);
            assert!(!t.value.is_empty());
            assert!(t.value.chars().count() <= limits.max_tag_chars);
        }
    }
});
