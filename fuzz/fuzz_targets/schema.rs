//! The feature-schema loader: any text as a schema file (vocabulary files resolve beside the
//! repository's own schema). Errors are fine; panics are not, and an accepted schema must map tags
//! to non-negative ids.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tagllm::{domain::Tag, features::Schema};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/fuzz.toml"));
    if let Ok(s) = Schema::parse(text, path) {
        let tags = [
            Tag { dimension: "brand".into(), value: "nike".into(), score: 0.5 },
            Tag { dimension: "scene".into(), value: "通勤".into(), score: 1.0 },
        ];
        for g in s.features(&tags) {
            assert!(g.ids.iter().all(|&id| id >= 0));
            assert_eq!(g.ids.len(), g.weights.len());
        }
    }
});
