//! Soak: mixed load against a running server (see `scripts/soak.sh`, which starts one) for a
//! bounded time and request count, loopback only. Reports calls by RPC and status, notes tagged,
//! and the server's RSS at the start, the end and its peak (sampled from /proc every second).
//!
//! cargo bench --bench soak -- --addr 127.0.0.1:50061 --pid 1234 --minutes 10 --max-requests 2000000

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tagllm::grpc::pb;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

struct Args {
    addr: String,
    pid: u32,
    minutes: f64,
    max_requests: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:50051".into(),
        pid: 0,
        minutes: 1.0,
        max_requests: 1_000_000,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--addr" => a.addr = v,
            "--pid" => a.pid = v.parse().expect("--pid N"),
            "--minutes" => a.minutes = v.parse().expect("--minutes X"),
            "--max-requests" => a.max_requests = v.parse().expect("--max-requests N"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Calls by (rpc, status code name).
#[derive(Default)]
struct Tally(Mutex<BTreeMap<(&'static str, String), u64>>);

impl Tally {
    fn add(&self, rpc: &'static str, code: tonic::Code) {
        let mut m = self.0.lock().unwrap();
        *m.entry((rpc, format!("{code:?}"))).or_default() += 1;
    }
}

struct Shared {
    tally: Tally,
    sent: AtomicU64,
    stop: AtomicBool,
    max: u64,
    deadline: Instant,
    tagged_ids: Mutex<Vec<String>>,
}

impl Shared {
    /// Whether another request may go out (time and count bounds).
    fn go(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        self.sent.fetch_add(1, Ordering::Relaxed) < self.max
    }
}

fn notes() -> Vec<pb::Note> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval_notes.jsonl"),
    )
    .unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            pb::Note {
                note_id: v["note_id"].as_str().unwrap().into(),
                category: v["category"].as_str().unwrap_or("").into(),
                title: v["title"].as_str().unwrap_or("").into(),
                body: v["body"].as_str().unwrap_or("").into(),
                ..Default::default()
            }
        })
        .collect()
}

async fn tagger(ch: Channel, s: Arc<Shared>, worker: usize) {
    let mut c = pb::tag_service_client::TagServiceClient::new(ch);
    let notes = notes();
    let mut k = 0usize;
    while s.go() {
        let mut n = notes[(k * 7 + worker) % notes.len()].clone();
        // Every third call repeats an earlier note (answered from the store), every tenth is
        // invalid; the rest are new content.
        let round = k / notes.len();
        if k % 10 == 9 {
            n.note_id.clear();
        } else if k % 3 != 2 {
            n.note_id = format!("soak-{worker}-{k}");
            n.body = format!("{} (#{round}-{k})", n.body);
        }
        k += 1;
        let id = n.note_id.clone();
        match c
            .tag_note(pb::TagNoteRequest {
                note: Some(n),
                ..Default::default()
            })
            .await
        {
            Ok(_) => {
                s.tally.add("TagNote", tonic::Code::Ok);
                s.tagged_ids.lock().unwrap().push(id);
            }
            Err(e) => {
                s.tally.add("TagNote", e.code());
                if e.code() == tonic::Code::ResourceExhausted {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

async fn streamer(ch: Channel, s: Arc<Shared>) {
    let mut c = pb::tag_service_client::TagServiceClient::new(ch);
    let notes = notes();
    let mut batch = 0usize;
    while s.go() {
        let reqs: Vec<pb::TagNoteRequest> = (0..8)
            .map(|i| {
                let mut n = notes[(batch * 8 + i) % notes.len()].clone();
                n.note_id = format!("soak-stream-{batch}-{i}");
                n.body = format!("{} (stream {batch})", n.body);
                pb::TagNoteRequest {
                    note: Some(n),
                    ..Default::default()
                }
            })
            .collect();
        batch += 1;
        match c.tag_notes(tokio_stream::iter(reqs)).await {
            Ok(r) => {
                let mut st = r.into_inner();
                let mut ok = true;
                while let Some(m) = st.next().await {
                    match m {
                        Ok(r) if r.error.is_none() => s.tagged_ids.lock().unwrap().push(r.note_id),
                        Ok(r) => s.tally.add(
                            "TagNotes entry",
                            tonic::Code::from_i32(r.error.map_or(2, |e| e.code)),
                        ),
                        Err(e) => {
                            s.tally.add("TagNotes", e.code());
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    s.tally.add("TagNotes", tonic::Code::Ok);
                }
            }
            Err(e) => s.tally.add("TagNotes", e.code()),
        }
    }
}

async fn reader(ch: Channel, s: Arc<Shared>, worker: usize) {
    let mut c = pb::feature_service_client::FeatureServiceClient::new(ch);
    let mut k = 0u64;
    while s.go() {
        k += 1;
        let known: Vec<String> = {
            let t = s.tagged_ids.lock().unwrap();
            t.iter().rev().take(400).cloned().collect()
        };
        let mut ids: Vec<String> = known;
        ids.extend((ids.len()..500).map(|i| format!("unknown-{worker}-{i}")));
        if k.is_multiple_of(50) {
            ids[0].clear(); // an invalid request now and then
        }
        let layout = if k.is_multiple_of(2) {
            pb::Layout::Jagged
        } else {
            pb::Layout::NoteMajor
        };
        let r = c
            .get_note_features(pb::GetNoteFeaturesRequest {
                note_ids: ids,
                layout: layout as i32,
                ..Default::default()
            })
            .await;
        s.tally.add(
            "GetNoteFeatures",
            r.map_or_else(|e| e.code(), |_| tonic::Code::Ok),
        );
        if k.is_multiple_of(200) {
            let r = async {
                let mut st = c
                    .scan_note_features(pb::ScanNoteFeaturesRequest {
                        limit: 200,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                while st.message().await?.is_some() {}
                Ok::<(), tonic::Status>(())
            }
            .await;
            s.tally.add(
                "ScanNoteFeatures",
                r.map_or_else(|e| e.code(), |()| tonic::Code::Ok),
            );
        }
    }
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ch = Channel::from_shared(format!("http://{}", args.addr))
            .unwrap()
            .connect()
            .await
            .expect("connecting to the server");
        let t0 = Instant::now();
        let shared = Arc::new(Shared {
            tally: Tally::default(),
            sent: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            max: args.max_requests,
            deadline: t0 + Duration::from_secs_f64(args.minutes * 60.0),
            tagged_ids: Mutex::new(Vec::new()),
        });
        let rss_start = rss_mib(args.pid);
        println!(
            "soak: {} for {} min (at most {} requests); server pid {} RSS {:.0} MiB",
            args.addr, args.minutes, args.max_requests, args.pid, rss_start
        );
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(streamer(ch.clone(), shared.clone())));
        for w in 0..2 {
            tasks.push(tokio::spawn(tagger(ch.clone(), shared.clone(), w)));
        }
        for w in 0..4 {
            tasks.push(tokio::spawn(reader(ch.clone(), shared.clone(), w)));
        }
        let mut peak = rss_start;
        let mut samples = Vec::new();
        while tasks.iter().any(|t| !t.is_finished()) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let r = rss_mib(args.pid);
            peak = peak.max(r);
            let el = t0.elapsed().as_secs();
            if el.is_multiple_of(60) && samples.last().map(|(t, _)| *t) != Some(el) {
                samples.push((el, r));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let rss_end = rss_mib(args.pid);
        println!("\n| RPC | Status | Calls |\n| --- | --- | --- |");
        let tally = shared.tally.0.lock().unwrap();
        for ((rpc, code), n) in tally.iter() {
            println!("| {rpc} | {code} | {n} |");
        }
        let total: u64 = tally.values().sum();
        println!(
            "\n{total} calls in {secs:.0} s; {} notes tagged; server RSS start {rss_start:.0} MiB, end {rss_end:.0} MiB, peak {peak:.0} MiB",
            shared.tagged_ids.lock().unwrap().len()
        );
        let per_min: Vec<String> = samples
            .iter()
            .map(|(t, r)| format!("{}m {r:.0}", t / 60))
            .collect();
        println!("RSS by minute (MiB): {}", per_min.join(", "));
    });
}
