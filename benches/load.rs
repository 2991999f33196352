//! Tagging load generator: a real server on 127.0.0.1:0 (in this process, real gRPC over loopback)
//! and TagNote clients at one or more concurrencies. For each concurrency it sends `--requests`
//! TagNote calls with `force` (fixture notes, cycled), `c` at a time, and reports notes/s,
//! aggregate generated and prompt tokens/s, latency p50/p99, and the mean queue, prefill and
//! decode time the server reported.
//!
//!     cargo bench --bench load                                  # default model, 1 and 16 clients
//!     cargo bench --bench load -- --model DIR --image synth:448 --decoding unconstrained \
//!         --max-new-tokens 64 --concurrency 1,16 --requests 32
//!
//! Flags: --model PATH (the default GGUF), --device (cpu), --dtype (auto), --concurrency LIST
//! (1,16), --requests N per concurrency (32), --notes K distinct fixture notes (12), --image
//! PATH or synth:N (an N x N synthetic image on every note; none by default), --max-new-tokens N
//! (config default), --decoding constrained|unconstrained (constrained), --requantize
//! none|q8_0 (q8_0), --max-batch N (config default), --prefix-cache N (entries; config default),
//! --prompt full|compact|auto (auto), --adapter DIR|auto|none (auto), --notes-from FILE|DIR (JSONL
//! notes instead of the fixtures; teacher records work) with --lang zh|en|mixed and --chars LO-HI
//! (title + body) to pick some, --out DIR (target/bench).
//!
//! It also writes the prompts the server saw, for the peers to run the same ones in the same run:
//! for a GGUF, `DIR/prompts.json` with token ids (`scripts/bench_llamacpp.py`); for a checkpoint
//! directory, `DIR/vl-prompts.json` with the rendered chat text, image paths and our prompt token
//! count (`scripts/bench_gpu_hf.py`). The results go to `DIR/load-<concurrency>.json`.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tagllm::{
    config::Config,
    domain::RawNote,
    grpc::pb,
    model::{chat::ChatTemplate, tokenizer, Requantize, TextModel},
    tagging::{handbook::Handbook, prompt, tagger::Decoding},
};
use tonic::transport::Channel;

struct Args {
    model: Option<PathBuf>,
    device: Option<String>,
    dtype: Option<String>,
    concurrency: Vec<usize>,
    requests: usize,
    notes: usize,
    image: Option<String>,
    max_new_tokens: Option<usize>,
    decoding: Decoding,
    requantize: Requantize,
    max_batch: Option<usize>,
    prefix_cache: Option<usize>,
    prompt: Option<String>,
    adapter: Option<String>,
    notes_from: Option<PathBuf>,
    lang: Option<String>,
    chars: Option<(usize, usize)>,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: None,
        device: None,
        dtype: None,
        concurrency: vec![1, 16],
        requests: 32,
        notes: 12,
        image: None,
        max_new_tokens: None,
        decoding: Decoding::Constrained,
        requantize: Requantize::Q8_0,
        max_batch: None,
        prefix_cache: None,
        prompt: None,
        adapter: None,
        notes_from: None,
        lang: None,
        chars: None,
        out: root().join("target/bench"),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let s = || argv.get(i + 1).cloned().expect("flag needs a value");
        let n = || s().parse::<usize>().expect("flag needs a number");
        match argv[i].as_str() {
            "--model" => a.model = Some(s().into()),
            "--device" => a.device = Some(s()),
            "--dtype" => a.dtype = Some(s()),
            "--concurrency" => {
                a.concurrency = s()
                    .split(',')
                    .map(|c| c.parse().expect("--concurrency 1,16"))
                    .collect()
            }
            "--requests" => a.requests = n(),
            "--notes" => a.notes = n(),
            "--image" => a.image = Some(s()),
            "--max-new-tokens" => a.max_new_tokens = Some(n()),
            "--decoding" => {
                a.decoding = match s().as_str() {
                    "constrained" => Decoding::Constrained,
                    "unconstrained" => Decoding::Unconstrained,
                    o => panic!("--decoding constrained|unconstrained, got {o}"),
                }
            }
            "--requantize" => {
                a.requantize = match s().as_str() {
                    "none" => Requantize::None,
                    "q8_0" => Requantize::Q8_0,
                    o => panic!("--requantize none|q8_0, got {o}"),
                }
            }
            "--max-batch" => a.max_batch = Some(n()),
            "--prefix-cache" => a.prefix_cache = Some(n()),
            "--prompt" => a.prompt = Some(s()),
            "--adapter" => a.adapter = Some(s()),
            "--notes-from" => a.notes_from = Some(s().into()),
            "--lang" => a.lang = Some(s()),
            "--chars" => {
                let v = s();
                let (lo, hi) = v.split_once('-').expect("--chars LO-HI");
                a.chars = Some((lo.parse().unwrap(), hi.parse().unwrap()));
            }
            "--out" => a.out = s().into(),
            _ => {
                i += 1; // cargo passes --bench; ignore unknown flags
                continue;
            }
        }
        i += 2;
    }
    a
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Up to `k` notes of the JSONL files at `path` (a file or a directory of them; teacher records
/// work), in file order, of language `lang` and `chars` characters of title and body.
fn file_notes(
    path: &Path,
    k: usize,
    lang: Option<&str>,
    chars: Option<(usize, usize)>,
) -> Vec<pb::Note> {
    let mut files = if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
            let n = text("title").chars().count() + text("body").chars().count();
            if lang.is_some_and(|l| v["lang"].as_str() != Some(l))
                || chars.is_some_and(|(lo, hi)| n < lo || n > hi)
            {
                continue;
            }
            out.push(pb::Note {
                note_id: text("note_id"),
                category: text("category"),
                title: text("title"),
                body: text("body"),
                images: vec![],
                updated_at_ms: 0,
            });
        }
    }
    assert!(!out.is_empty(), "no note of {} matches", path.display());
    out.truncate(k.max(1));
    out
}

/// Up to `k` fixture notes, English and Chinese alternating across categories.
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
    out.sort_by_key(|n| n.note_id.ends_with("-001"));
    out.truncate(k.max(1));
    out
}

/// The image every note carries: a file, or `synth:N`, an N x N PNG with smooth gradients and
/// a pattern (written to `out` so the peer reads the same bytes).
fn note_image(spec: &str, out: &Path) -> PathBuf {
    let Some(n) = spec.strip_prefix("synth:") else {
        return PathBuf::from(spec);
    };
    let n: u32 = n.parse().expect("synth:N");
    let img = image::RgbImage::from_fn(n, n, |x, y| {
        let (fx, fy) = (x as f32 / n as f32, y as f32 / n as f32);
        let ring = (((fx - 0.5).hypot(fy - 0.5) * 40.0).sin() * 0.5 + 0.5) * 255.0;
        image::Rgb([(fx * 255.0) as u8, (fy * 255.0) as u8, ring as u8])
    });
    let path = out.join(format!("note-{n}.png"));
    img.save(&path).unwrap();
    path
}

/// What the peers need to run the prompts the server ran.
fn dump_prompts(
    cfg: &Config,
    handbook: &Handbook,
    notes: &[pb::Note],
    images: &[PathBuf],
    prompt_tokens: &[u32],
    out: &Path,
) {
    let path = &cfg.model.path;
    let render = |n: &pb::Note| {
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
        (
            prompt::messages(
                &note,
                cat,
                &cfg.limits,
                images.len(),
                cfg.model.prompt_style().unwrap(),
            ),
            prompt::assistant_prefix(cat),
        )
    };
    if path.is_dir() {
        let tok = tokenizers::Tokenizer::from_file(path.join("tokenizer.json")).unwrap();
        let special = tokenizer::from_hf_dir(path, &tok).unwrap();
        let src = tokenizer::hf_chat_template(path)
            .unwrap()
            .expect("a chat template");
        let template = ChatTemplate::new(&src, &special.bos_text, &special.eos_text).unwrap();
        let prompts: Vec<serde_json::Value> = notes
            .iter()
            .zip(prompt_tokens)
            .map(|(n, &pt)| {
                let (messages, prefix) = render(n);
                let mut text = template.render(&messages, true).unwrap();
                text.push_str(&prefix);
                serde_json::json!({
                    "note_id": n.note_id,
                    "text": text,
                    "images": images.iter().map(|p| std::fs::canonicalize(p).unwrap()).collect::<Vec<_>>(),
                    "prompt_tokens": pt,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "model": std::fs::canonicalize(path).unwrap(),
            "new_tokens": cfg.model.max_new_tokens,
            "image_max_pixels": cfg.model.image_max_pixels,
            "prompts": prompts,
        });
        std::fs::write(
            out.join("vl-prompts.json"),
            serde_json::to_string_pretty(&doc).unwrap(),
        )
        .unwrap();
    } else {
        let model = TextModel::load(path, Requantize::None).unwrap();
        let prompts: Vec<serde_json::Value> = notes
            .iter()
            .map(|n| {
                let (messages, prefix) = render(n);
                let ids = model.encode_chat(&messages, &prefix).unwrap();
                serde_json::json!({"note_id": n.note_id, "prompt_ids": ids})
            })
            .collect();
        let doc =
            serde_json::json!({"max_new_tokens": cfg.model.max_new_tokens, "prompts": prompts});
        std::fs::write(
            out.join("prompts.json"),
            serde_json::to_string(&doc).unwrap(),
        )
        .unwrap();
    }
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One call's outcome.
#[derive(Clone, Default)]
struct Call {
    wall_ms: f64,
    queue_ms: f64,
    prefill_ms: f64,
    decode_ms: f64,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    generated_tokens: u32,
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.out).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        handbook: root().join("models/handbook.toml"),
        schema: root().join("models/features.toml"),
        ..Config::default()
    };
    cfg.model.path = args
        .model
        .clone()
        .unwrap_or_else(|| root().join(&cfg.model.path));
    cfg.model.requantize = args.requantize;
    cfg.model.decoding = args.decoding;
    if let Some(d) = &args.device {
        cfg.model.device = d.clone();
    }
    if let Some(d) = &args.dtype {
        cfg.model.dtype = d.clone();
    }
    if let Some(n) = args.max_new_tokens {
        cfg.model.max_new_tokens = n;
    }
    if let Some(n) = args.max_batch {
        cfg.model.max_batch = n;
    }
    if let Some(n) = args.prefix_cache {
        cfg.model.prefix_cache_entries = n;
    }
    if let Some(p) = &args.prompt {
        cfg.model.prompt = p.clone();
    }
    if let Some(a) = &args.adapter {
        cfg.model.adapter = a.clone();
    }
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(1);
    cfg.model.queue_capacity = cfg.model.queue_capacity.max(2 * max_conc);
    // The metrics layer and endpoint run as in production, on a free port.
    cfg.server.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let handbook = Handbook::load(&cfg.handbook).unwrap();

    let images: Vec<PathBuf> = args
        .image
        .iter()
        .map(|s| note_image(s, &args.out))
        .collect();
    let image_bytes: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut notes = match &args.notes_from {
        Some(p) => file_notes(
            &root().join(p),
            args.notes,
            args.lang.as_deref(),
            args.chars,
        ),
        None => fixture_notes(args.notes),
    };
    for n in &mut notes {
        n.images = image_bytes
            .iter()
            .map(|b| pb::Image {
                source: Some(pb::image::Source::Data(b.clone())),
            })
            .collect();
    }
    println!(
        "machine: {} cores; model {}; device {}; dtype {}; decoding {:?}; max_new_tokens {}; max_batch {}; prefix cache {}; {} distinct notes, {} image(s) each",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cfg.model.path.display(),
        cfg.model.device,
        cfg.model.dtype,
        cfg.model.decoding,
        cfg.model.max_new_tokens,
        cfg.model.max_batch,
        cfg.model.prefix_cache_entries,
        notes.len(),
        images.len(),
    );

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
        let t_load = Instant::now();
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
        println!("model ready in {:.1} s", t_load.elapsed().as_secs_f64());
        let ch = connect(addr).await;
        let notes = Arc::new(notes);

        // Warm-up: every distinct note once, sequentially; their prompt sizes go to the peers.
        let mut prompt_tokens = Vec::new();
        let mut client = pb::tag_service_client::TagServiceClient::new(ch.clone());
        for n in notes.iter() {
            let r = client
                .tag_note(pb::TagNoteRequest { note: Some(n.clone()), force: true, include_raw_output: false })
                .await
                .unwrap()
                .into_inner();
            prompt_tokens.push(r.timings.unwrap().prompt_tokens);
        }
        dump_prompts(&cfg, &handbook, &notes, &images, &prompt_tokens, &args.out);

        println!("\n| Clients | Notes/s | Generated tok/s | Prompt tok/s | Latency p50 ms | p99 ms | Queue ms (mean) | Prefill ms (mean) | Decode ms (mean) | Gen tok/note | Cached prompt tok/note |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut base_tps = None;
        for &c in &args.concurrency {
            let next = Arc::new(AtomicUsize::new(0));
            let t0 = Instant::now();
            let tasks: Vec<_> = (0..c)
                .map(|_| {
                    let (ch, notes, next) = (ch.clone(), notes.clone(), next.clone());
                    let total = args.requests;
                    tokio::spawn(async move {
                        let mut client = pb::tag_service_client::TagServiceClient::new(ch)
                            .max_encoding_message_size(64 << 20);
                        let mut calls = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                return calls;
                            }
                            let t = Instant::now();
                            let r = client
                                .tag_note(pb::TagNoteRequest {
                                    note: Some(notes[i % notes.len()].clone()),
                                    force: true,
                                    include_raw_output: false,
                                })
                                .await
                                .unwrap()
                                .into_inner();
                            let tm = r.timings.unwrap();
                            calls.push(Call {
                                wall_ms: t.elapsed().as_secs_f64() * 1e3,
                                queue_ms: tm.queue_ms,
                                prefill_ms: tm.prefill_ms,
                                decode_ms: tm.decode_ms,
                                prompt_tokens: tm.prompt_tokens,
                                cached_prompt_tokens: tm.cached_prompt_tokens,
                                generated_tokens: tm.generated_tokens,
                            });
                        }
                    })
                })
                .collect();
            let mut calls = Vec::new();
            for t in tasks {
                calls.extend(t.await.unwrap());
            }
            let wall = t0.elapsed().as_secs_f64();
            let mut lat: Vec<f64> = calls.iter().map(|c| c.wall_ms).collect();
            lat.sort_by(f64::total_cmp);
            let n = calls.len() as f64;
            let gen: u64 = calls.iter().map(|c| c.generated_tokens as u64).sum();
            let prompt: u64 = calls.iter().map(|c| c.prompt_tokens as u64).sum();
            let mean = |f: fn(&Call) -> f64| calls.iter().map(f).sum::<f64>() / n;
            let tps = gen as f64 / wall;
            let base = *base_tps.get_or_insert(tps);
            println!(
                "| {c} | {:.3} | {:.1} ({:.2}x) | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
                n / wall,
                tps,
                tps / base,
                prompt as f64 / wall,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                mean(|c| c.queue_ms),
                mean(|c| c.prefill_ms),
                mean(|c| c.decode_ms),
                gen as f64 / n,
                mean(|c| c.cached_prompt_tokens as f64),
            );
            let unix = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
            };
            let end = std::time::SystemTime::now();
            let doc = serde_json::json!({
                "concurrency": c, "requests": calls.len(), "wall_s": wall,
                "t_start_unix": unix(end) - wall, "t_end_unix": unix(end),
                "notes_per_s": n / wall, "generated_tok_s": tps, "prompt_tok_s": prompt as f64 / wall,
                "latency_ms": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99), "max": lat[lat.len() - 1]},
                "mean_ms": {"queue": mean(|c| c.queue_ms), "prefill": mean(|c| c.prefill_ms), "decode": mean(|c| c.decode_ms)},
                "generated_tokens": gen, "prompt_tokens": prompt,
            });
            std::fs::write(args.out.join(format!("load-{c}.json")), doc.to_string()).unwrap();
        }
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    });
}
