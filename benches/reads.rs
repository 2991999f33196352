//! Feature-read load generator and its peer: GetNoteFeatures from a running tagllm server against
//! `MGET` from a Redis server holding the same encoded records, same client, same concurrency.
//! `scripts/bench_reads.sh` runs the whole comparison (server, Redis, both phases below).
//!
//!     reads fill --data-dir DIR [--notes 10000]        # synthetic tagged notes, before `serve`
//!     reads run --addr HOST:PORT --redis HOST:PORT [--notes 10000] [--batch 500]
//!               [--requests 2000] [--concurrency 4] [--rounds 3]
//!               [--targets note-major,note-major-prost-codec,jagged,redis]
//!               [--window-kib N] [--adaptive-window]
//!
//! `run` first reads every note once through GetNoteFeatures (this fills the server's cache), and
//! stores each note's `NoteFeatures` message, encoded, in Redis under its id: the bytes the server
//! sends for that note. Then, for each round, it times the same random batches of ids against
//! each target: tagllm in both layouts (through the crate's generated client, whose codec decodes
//! from contiguous bytes: `tagllm::grpc::codec`), NOTE_MAJOR again through tonic's stock
//! `ProstCodec`, then Redis `MGET` with every value decoded into the same `NoteFeatures` message
//! the gRPC client decodes (a ranking service that kept its features in Redis would decode them
//! too). The client runs on one thread (a current-thread runtime), so
//! the other core is the server's, whichever server it is; `concurrency` calls are in flight at a
//! time over one connection (HTTP/2 streams for tagllm, a multiplexed connection for Redis).
//! Prints each round, then median (min-max) over rounds and tagllm's notes/s over Redis's.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use prost::Message;
use tagllm::{
    domain::normalize,
    domain::{Tag, Versions},
    grpc::pb,
    store::{RedbStore, Store, StoredNote},
    tagging::handbook::Handbook,
};
use tonic::transport::Channel;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes synthetic tagged notes into a data directory's store.
    Fill {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        notes: usize,
    },
    /// Loads Redis from the server and times both.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    addr: String,
    #[arg(long)]
    redis: String,
    #[arg(long, default_value_t = 10_000)]
    notes: usize,
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Which targets to time (all four by default; the ratio needs `redis`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Target::NoteMajor, Target::NoteMajorProstCodec, Target::Jagged, Target::Redis])]
    targets: Vec<Target>,
    /// The gRPC client's HTTP/2 stream and connection windows, KiB (0: h2's default, 64).
    #[arg(long, default_value_t = 0)]
    window_kib: u32,
    /// The gRPC client's HTTP/2 adaptive (BDP-estimating) window.
    #[arg(long)]
    adaptive_window: bool,
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

fn note_id(i: usize) -> String {
    format!("note-{i:07}")
}

/// 8-16 tags per note drawn from the handbook's examples, across all of a category's dimensions.
fn fill(dir: &std::path::Path, n: usize) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let handbook = Handbook::load(&root.join("models/handbook.toml")).unwrap();
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
            note_id: note_id(i),
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

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Target {
    NoteMajor,
    /// NOTE_MAJOR read through tonic's stock `ProstCodec` instead of the crate's generated client
    /// (whose `SliceCodec` decodes from contiguous bytes).
    NoteMajorProstCodec,
    Jagged,
    Redis,
}

/// One timed pass: latencies (ms), wall time (s) and the bytes of one response.
struct Pass {
    lat: Vec<f64>,
    wall: f64,
}

impl Pass {
    fn pct(&self, p: f64) -> f64 {
        self.lat[((self.lat.len() as f64 - 1.0) * p).round() as usize]
    }
    fn notes_per_s(&self, batch: usize) -> f64 {
        (self.lat.len() * batch) as f64 / self.wall
    }
}

#[allow(clippy::too_many_arguments)]
async fn pass(
    target: Target,
    ch: &Channel,
    redis: &redis::aio::MultiplexedConnection,
    ids: &Arc<Vec<String>>,
    batch: usize,
    requests: usize,
    concurrency: usize,
    seed: u64,
) -> Pass {
    let per_task = requests / concurrency;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let ids = ids.clone();
        let ch = ch.clone();
        let mut redis = redis.clone();
        tasks.push(tokio::spawn(async move {
            let mut grpc = pb::feature_service_client::FeatureServiceClient::new(ch.clone())
                .max_decoding_message_size(64 << 20);
            let mut raw = tonic::client::Grpc::new(ch).max_decoding_message_size(64 << 20);
            let mut rng = Rng(seed + w as u64);
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let req: Vec<String> = (0..batch)
                    .map(|_| ids[rng.below(ids.len())].clone())
                    .collect();
                let t = Instant::now();
                let found = match target {
                    Target::NoteMajorProstCodec => {
                        raw.ready().await.unwrap();
                        let r: pb::GetNoteFeaturesResponse = raw
                            .unary(
                                tonic::Request::new(pb::GetNoteFeaturesRequest {
                                    note_ids: req,
                                    groups: vec![],
                                    include_tags: false,
                                    layout: pb::Layout::NoteMajor as i32,
                                }),
                                http::uri::PathAndQuery::from_static(
                                    "/tagllm.v1.FeatureService/GetNoteFeatures",
                                ),
                                tonic_prost::ProstCodec::<
                                    pb::GetNoteFeaturesRequest,
                                    pb::GetNoteFeaturesResponse,
                                >::default(),
                            )
                            .await
                            .unwrap()
                            .into_inner();
                        r.notes.iter().filter(|n| n.found).count()
                    }
                    Target::NoteMajor | Target::Jagged => {
                        let layout = if target == Target::Jagged {
                            pb::Layout::Jagged
                        } else {
                            pb::Layout::NoteMajor
                        };
                        let r = grpc
                            .get_note_features(pb::GetNoteFeaturesRequest {
                                note_ids: req,
                                groups: vec![],
                                include_tags: false,
                                layout: layout as i32,
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        match r.jagged {
                            Some(j) => j.found.iter().filter(|f| **f).count(),
                            None => r.notes.iter().filter(|n| n.found).count(),
                        }
                    }
                    Target::Redis => {
                        let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                            .arg(&req)
                            .query_async(&mut redis)
                            .await
                            .unwrap();
                        let notes: Vec<pb::NoteFeatures> = vals
                            .iter()
                            .map(|v| {
                                pb::NoteFeatures::decode(v.as_deref().expect("a stored note"))
                                    .unwrap()
                            })
                            .collect();
                        notes.iter().filter(|n| n.found).count()
                    }
                };
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(found, batch, "{target:?}: every id must be found");
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Pass { lat, wall }
}

fn median(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

#[allow(clippy::too_many_arguments)]
async fn run(args: RunArgs) {
    let RunArgs {
        addr,
        redis: redis_addr,
        notes,
        batch,
        requests,
        concurrency,
        rounds,
        targets,
        window_kib,
        adaptive_window,
    } = args;
    let mut endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    if window_kib > 0 {
        endpoint = endpoint
            .initial_stream_window_size(window_kib << 10)
            .initial_connection_window_size(window_kib << 10);
    }
    if adaptive_window {
        endpoint = endpoint.http2_adaptive_window(true);
    }
    let ch = endpoint.connect().await.unwrap();
    let client = redis::Client::open(format!("redis://{redis_addr}/")).unwrap();
    let redis = client.get_multiplexed_async_connection().await.unwrap();
    let ids: Arc<Vec<String>> = Arc::new((0..notes).map(note_id).collect());

    // Warm the server's cache and copy every note's encoding into Redis.
    let mut grpc = pb::feature_service_client::FeatureServiceClient::new(ch.clone())
        .max_decoding_message_size(64 << 20);
    let mut con = redis.clone();
    let mut bytes = 0usize;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut con).await.unwrap();
    for chunk in ids.chunks(batch) {
        let r = grpc
            .get_note_features(pb::GetNoteFeaturesRequest {
                note_ids: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut pipe = redis::pipe();
        for n in &r.notes {
            assert!(
                n.found,
                "{} is not in the server's store: run `reads fill` first",
                n.note_id
            );
            let v = n.encode_to_vec();
            bytes += v.len();
            pipe.set(&n.note_id, v).ignore();
        }
        let _: () = pipe.query_async(&mut con).await.unwrap();
    }
    println!(
        "{notes} notes, {:.0} bytes per encoded note on average; batches of {batch} ids, {requests} calls per pass, concurrency {concurrency}, {rounds} rounds",
        bytes as f64 / notes as f64
    );

    let mut results: Vec<Vec<Pass>> = targets.iter().map(|_| Vec::new()).collect();
    // One untimed pass each, then the rounds; every target sees the same ids in each round.
    for &t in &targets {
        let _ = pass(t, &ch, &redis, &ids, batch, requests / 10, concurrency, 99).await;
    }
    for round in 0..rounds {
        for (i, &t) in targets.iter().enumerate() {
            let p = pass(
                t,
                &ch,
                &redis,
                &ids,
                batch,
                requests,
                concurrency,
                1 + round as u64 * 1000,
            )
            .await;
            println!(
                "round {round} {t:?}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.0} notes/s",
                p.pct(0.5),
                p.pct(0.9),
                p.pct(0.99),
                p.lat[p.lat.len() - 1],
                p.notes_per_s(batch)
            );
            results[i].push(p);
        }
    }
    println!("\n| Target | p50 ms | p99 ms | notes/s | vs Redis |");
    println!("| --- | --- | --- | --- | --- |");
    let redis_nps = targets
        .iter()
        .position(|&t| t == Target::Redis)
        .map(|i| median(results[i].iter().map(|p| p.notes_per_s(batch)).collect()).0);
    for (i, t) in targets.iter().enumerate() {
        let (p50, p50lo, p50hi) = median(results[i].iter().map(|p| p.pct(0.5)).collect());
        let (p99, p99lo, p99hi) = median(results[i].iter().map(|p| p.pct(0.99)).collect());
        let (nps, lo, hi) = median(results[i].iter().map(|p| p.notes_per_s(batch)).collect());
        let name = match t {
            Target::NoteMajor => "tagllm GetNoteFeatures, NOTE_MAJOR",
            Target::NoteMajorProstCodec => "tagllm GetNoteFeatures, NOTE_MAJOR, tonic's ProstCodec",
            Target::Jagged => "tagllm GetNoteFeatures, JAGGED",
            Target::Redis => "Redis MGET + decode",
        };
        let ratio = redis_nps.map_or("-".to_string(), |r| format!("{:.2}x", nps / r));
        println!(
            "| {name} | {p50:.2} ({p50lo:.2}-{p50hi:.2}) | {p99:.2} ({p99lo:.2}-{p99hi:.2}) | {nps:.0} ({lo:.0}-{hi:.0}) | {ratio} |"
        );
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = Cli::parse_from(argv);
    match cli.command {
        Cmd::Fill { data_dir, notes } => {
            let t = Instant::now();
            fill(&data_dir, notes);
            println!(
                "filled {} with {notes} notes in {:.1} s",
                data_dir.display(),
                t.elapsed().as_secs_f64()
            );
        }
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(args));
            // Give in-flight connection tasks a moment before the runtime drops them.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
