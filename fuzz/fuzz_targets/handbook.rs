//! The handbook loader: any text as a handbook file. Errors are fine; panics are not, and an
//! accepted handbook must render guidance for every category.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tagllm::tagging::handbook::Handbook;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(h) = Handbook::parse(text, "fuzz.toml") {
        for c in std::iter::once(&h.fallback).chain(&h.categories) {
            let _ = c.guidance();
            let _ = tagllm::tagging::grammar::tag_grammar(c, &tagllm::domain::Limits::default());
        }
    }
});
