//! Micro-benchmarks of the pure per-note work: output parsing, normalization, tag -> feature ids.
//!
//!     cargo bench --bench features

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use tagllm::{
    domain::{normalize, Limits},
    features::Schema,
    tagging::{handbook::Handbook, tags},
};

fn benches(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let handbook = Handbook::load(&root.join("models/handbook.toml")).unwrap();
    let schema = Schema::load(&root.join("models/features.toml")).unwrap();
    let cat = handbook.resolve("sneakers");
    let limits = Limits::default();
    let output = r#"{"brand": ["Nike", "Air Jordan"], "series": ["Dunk Low"], "colorway": ["Panda", "熊猫配色"], "silhouette": ["low-top"], "style": ["Y2K", "极简"], "scene": ["通勤", "city walk"], "wearing_feel": ["comfortable"], "price_band": ["¥500-1000"]}"#;
    c.bench_function("parse_output (8 dims, 12 tags)", |b| {
        b.iter(|| tags::parse_output(std::hint::black_box(output), cat, &limits))
    });
    c.bench_function("normalize (full-width)", |b| {
        b.iter(|| normalize(std::hint::black_box("ＡＩＲ　 Jordan 1 Retro High OG")))
    });
    let parsed = tags::parse_output(output, cat, &limits);
    c.bench_function("schema.features (12 tags, 8 groups)", |b| {
        b.iter(|| schema.features(std::hint::black_box(&parsed.tags)))
    });
}

criterion_group!(features, benches);
criterion_main!(features);
