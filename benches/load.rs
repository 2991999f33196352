//! Load generator: a real server on 127.0.0.1:0 with the default model, driven over gRPC.
//!
//! Phase 1 (tagging): TagNote with `force` on one fixture note per category, sequentially; reports
//! latency, prompt and generated tokens, prefill and decode tokens/s. It also writes the prompt
//! token ids to `target/bench/prompts.json`, so `scripts/bench_llamacpp.py` can time llama.cpp on
//! exactly the same prompts in the same run.
//!
//! Phase 2 (feature reads): fills the store with synthetic tagged notes (tags drawn from the
//! handbook's examples), warms the cache, then sends GetNoteFeatures batches of random ids at a
//! fixed concurrency, in both layouts; reports latency percentiles and notes/s.
//!
//!     cargo bench --bench load                      # defaults below
//!     cargo bench --bench load -- --tag-notes 0     # feature reads only
//!
//! Flags: --tag-notes N (6), --notes N (10000), --batch N (500), --requests N (2000; 0 skips
//! phase 2), --concurrency N (4), --requantize none|q8_0 (q8_0).

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tagllm::{
    config::{Config, Requantize},
    domain::{RawNote, Tag, Versions},
    grpc::pb,
    handbook::Handbook,
    model::TextModel,
    prompt,
    store::{RedbStore, Store, StoredNote},
    tags::normalize,
};
use tonic::transport::Channel;

struct Args {
    requantize: Requantize,
    tag_notes: usize,
    notes: usize,
    batch: usize,
    requests: usize,
    concurrency: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        requantize: Requantize::Q8_0,
        tag_notes: 6,
        notes: 10_000,
        batch: 500,
        requests: 2000,
        concurrency: 4,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match argv[i].as_str() {
            "--tag-notes" => a.tag_notes = val().expect("--tag-notes N"),
            "--notes" => a.notes = val().expect("--notes N"),
            "--batch" => a.batch = val().expect("--batch N"),
            "--requests" => a.requests = val().expect("--requests N"),
            "--concurrency" => a.concurrency = val().expect("--concurrency N"),
            "--requantize" => {
                a.requantize = match argv.get(i + 1).map(String::as_str) {
                    Some("none") => Requantize::None,
                    Some("q8_0") => Requantize::Q8_0,
                    other => panic!("--requantize none|q8_0, got {other:?}"),
                }
            }
            _ => {
                i += 1; // cargo passes --bench; ignore unknown flags
                continue;
            }
        }
        i += 2;
    }
    a
}

/// xorshift64*: deterministic, dependency-free randomness for synthetic data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fill_store(dir: &Path, handbook: &Handbook, n: usize) {
    let store = RedbStore::open(dir).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut batch = Vec::with_capacity(n);
    for i in 0..n {
        let cat = &handbook.categories[rng.below(handbook.categories.len())];
        let mut tags = Vec::new();
        for d in &cat.dimensions {
            for _ in 0..1 + rng.below(2) {
                let ex = &d.examples[rng.below(d.examples.len())];
                tags.push(Tag {
                    dimension: d.key.clone(),
                    value: normalize(ex),
                    score: 0.5 + (rng.below(50) as f32) / 100.0,
                });
            }
        }
        tags.dedup_by(|a, b| a.dimension == b.dimension && a.value == b.value);
        batch.push(StoredNote {
            note_id: format!("note-{i:07}"),
            category: cat.key.clone(),
            handbook_category: cat.key.clone(),
            content_hash: String::new(),
            versions: Versions::default(),
            tags,
            tagged_at_ms: 1,
            raw_output: String::new(),
            dropped_tags: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
        });
    }
    store.put_many(&batch).unwrap();
}

fn fixture_notes(k: usize) -> Vec<pb::Note> {
    let mut out = Vec::new();
    for cat in ["sneakers", "apparel", "beauty", "digital", "food", "travel"] {
        for n in [2, 1] {
            let text = std::fs::read_to_string(
                root().join(format!("tests/fixtures/notes/{cat}_{n}.json")),
            )
            .unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            out.push(pb::Note {
                note_id: v["note_id"].as_str().unwrap().into(),
                category: v["category"].as_str().unwrap().into(),
                title: v["title"].as_str().unwrap().into(),
                body: v["body"].as_str().unwrap().into(),
                images: vec![],
                updated_at_ms: 0,
            });
        }
    }
    // Alternate languages across categories: English first, then Chinese.
    out.sort_by_key(|n| n.note_id.ends_with("-001"));
    out.truncate(k);
    out
}

fn dump_prompts(cfg: &Config, handbook: &Handbook, notes: &[pb::Note]) {
    let model = TextModel::load(&cfg.model.path, Requantize::None).unwrap();
    let prompts: Vec<serde_json::Value> = notes
        .iter()
        .map(|n| {
            let note = RawNote {
                note_id: n.note_id.clone(),
                category: n.category.clone(),
                title: n.title.clone(),
                body: n.body.clone(),
                ..Default::default()
            }
            .validate(&cfg.limits)
            .unwrap();
            let cat = handbook.resolve(&note.category);
            let ids = model
                .encode_chat(
                    &prompt::messages(&note, cat, &cfg.limits, 0),
                    &prompt::assistant_prefix(cat),
                )
                .unwrap();
            serde_json::json!({"note_id": n.note_id, "prompt_ids": ids})
        })
        .collect();
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let out = serde_json::json!({"max_new_tokens": cfg.model.max_new_tokens, "prompts": prompts});
    std::fs::write(
        dir.join("prompts.json"),
        serde_json::to_string(&out).unwrap(),
    )
    .unwrap();
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn main() {
    let args = parse_args();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        handbook: root().join("models/handbook.toml"),
        schema: root().join("models/features.toml"),
        ..Config::default()
    };
    cfg.model.path = root().join(&cfg.model.path);
    cfg.model.requantize = args.requantize;
    // The metrics layer and endpoint run as in production, on a free port.
    cfg.server.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.max_ids_per_request = cfg.limits.max_ids_per_request.max(args.batch);
    let handbook = Handbook::load(&cfg.handbook).unwrap();
    println!(
        "machine: {} cores; model {}; requantize {:?}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cfg.model.path.display(),
        cfg.model.requantize
    );

    let t = Instant::now();
    fill_store(dir.path(), &handbook, args.notes);
    println!(
        "filled store with {} synthetic notes in {:.1} s",
        args.notes,
        t.elapsed().as_secs_f64()
    );
    let notes = fixture_notes(args.tag_notes);
    if !notes.is_empty() {
        dump_prompts(&cfg, &handbook, &notes);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tagllm::server::run(cfg.clone(), listener, async {
            let _ = stop_rx.await;
        }));
        // Wait for the model.
        loop {
            if let Ok(ch) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if let Ok(r) = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await {
                    if r.into_inner().status == 1 {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Phase 1: tagging.
        if !notes.is_empty() {
            let mut client = pb::tag_service_client::TagServiceClient::new(connect(addr).await);
            println!("\nTagNote (force, sequential, max_new_tokens {}):", cfg.model.max_new_tokens);
            println!("| note | prompt tok | gen tok | prefill ms | decode ms | prefill tok/s | decode tok/s | total ms |");
            println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
            let (mut pt, mut gt, mut pms, mut dms, mut tot) = (0u64, 0u64, 0f64, 0f64, Vec::new());
            for n in &notes {
                let t0 = Instant::now();
                let r = client
                    .tag_note(pb::TagNoteRequest {
                        note: Some(n.clone()),
                        force: true,
                        include_raw_output: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let wall = t0.elapsed().as_secs_f64() * 1e3;
                let t = r.timings.unwrap();
                println!(
                    "| {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
                    n.note_id,
                    t.prompt_tokens,
                    t.generated_tokens,
                    t.prefill_ms,
                    t.decode_ms,
                    t.prompt_tokens as f64 / t.prefill_ms * 1e3,
                    t.generated_tokens as f64 / t.decode_ms * 1e3,
                    wall
                );
                pt += t.prompt_tokens as u64;
                gt += t.generated_tokens as u64;
                pms += t.prefill_ms;
                dms += t.decode_ms;
                tot.push(wall);
            }
            tot.sort_by(f64::total_cmp);
            println!(
                "all: prefill {:.1} tok/s, decode {:.1} tok/s, latency p50 {:.0} ms, max {:.0} ms, {:.3} notes/s",
                pt as f64 / pms * 1e3,
                gt as f64 / dms * 1e3,
                percentile(&tot, 0.5),
                tot[tot.len() - 1],
                tot.len() as f64 / (tot.iter().sum::<f64>() / 1e3)
            );
        }

        // Phase 2: feature reads.
        if args.requests == 0 || args.notes == 0 {
            let _ = stop_tx.send(());
            server.await.unwrap().unwrap();
            return;
        }
        let ids: Arc<Vec<String>> = Arc::new((0..args.notes).map(|i| format!("note-{i:07}")).collect());
        let ch = connect(addr).await;
        let mut warm = pb::feature_service_client::FeatureServiceClient::new(ch.clone());
        for chunk in ids.chunks(args.batch) {
            warm.get_note_features(pb::GetNoteFeaturesRequest {
                note_ids: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        for layout in [pb::Layout::NoteMajor, pb::Layout::Jagged] {
            let per_task = args.requests / args.concurrency;
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..args.concurrency {
                let ids = ids.clone();
                let ch = ch.clone();
                let batch = args.batch;
                tasks.push(tokio::spawn(async move {
                    let mut c = pb::feature_service_client::FeatureServiceClient::new(ch)
                        .max_decoding_message_size(64 << 20);
                    let mut rng = Rng(0x1234_5678 + w as u64);
                    let mut lat = Vec::with_capacity(per_task);
                    let mut bytes = 0usize;
                    for _ in 0..per_task {
                        let req: Vec<String> = (0..batch).map(|_| ids[rng.below(ids.len())].clone()).collect();
                        let t = Instant::now();
                        let r = c
                            .get_note_features(pb::GetNoteFeaturesRequest {
                                note_ids: req,
                                groups: vec![],
                                include_tags: false,
                                layout: layout as i32,
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                        bytes = prost::Message::encoded_len(&r);
                    }
                    (lat, bytes)
                }));
            }
            let mut lat = Vec::new();
            let mut bytes = 0;
            for t in tasks {
                let (l, b) = t.await.unwrap();
                lat.extend(l);
                bytes = b;
            }
            let wall = t0.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            println!(
                "\nGetNoteFeatures {layout:?}: {} calls x {} ids, concurrency {}, response {} KB: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} calls/s, {:.0} notes/s",
                lat.len(),
                args.batch,
                args.concurrency,
                bytes / 1024,
                percentile(&lat, 0.5),
                percentile(&lat, 0.9),
                percentile(&lat, 0.99),
                lat[lat.len() - 1],
                lat.len() as f64 / wall,
                (lat.len() * args.batch) as f64 / wall
            );
        }
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    });
}
