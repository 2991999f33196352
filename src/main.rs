//! `tagllm`: serve (`tagllm serve`), backfill a JSONL file through a server (`tagllm backfill`),
//! or tag one note without a server (`tagllm tag note.json`).

mod eval;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tagllm::{config::Config, domain::RawNote, server, tagger::Tagger};

#[derive(Parser)]
#[command(
    version,
    about = "Tags user notes with a handbook-guided LLM and serves the tags as recommender features"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Tag every note of a JSONL file with each decoding mode and report output validity,
    /// redundancy and speed (no server, no store).
    Eval {
        /// Notes, one JSON object per line, or a directory of such files (extra fields such as
        /// `injection` are read for the report; teacher records, the `datasets/distill` format, are
        /// also scored against their tags: precision, recall and F1).
        notes: PathBuf,
        /// Decoding modes to compare.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["constrained".to_string(), "unconstrained".to_string()])]
        decoding: Vec<String>,
        /// Print one JSON line per note too.
        #[arg(long)]
        verbose: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Tag every note of a JSONL file through a running server's TagNotes stream, with a
    /// progress bar; resumable (acknowledged ids go to a state file and are skipped next time).
    /// Exits 1 when any note failed (see the failure file), 2 on a broken run.
    Backfill {
        /// Notes, one JSON object per line: {"note_id", "category", "title", "body",
        /// "images": [uri...], "updated_at_ms"}; other fields are ignored.
        notes: PathBuf,
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// Acknowledged ids (default: NOTES.done).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Failed notes as JSONL (default: NOTES.failed).
        #[arg(long)]
        failures: Option<PathBuf>,
        /// Forget the state file and send every note again.
        #[arg(long)]
        restart: bool,
        /// Regenerate even when the stored tags are current.
        #[arg(long)]
        force: bool,
        /// Notes in flight at once.
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Retries per note refused for overload, with exponential backoff from 250 ms.
        #[arg(long, default_value_t = 8)]
        retries: u32,
        /// Send at most this many new notes (0: all), e.g. for a canary run.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// CA to trust for an https:// address (PEM).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Client certificate (PEM), for a server that requires mutual TLS.
        #[arg(long, requires = "key_file")]
        cert_file: Option<PathBuf>,
        /// Client private key (PEM).
        #[arg(long, requires = "cert_file")]
        key_file: Option<PathBuf>,
    },
    /// Build a tag-distillation dataset: ask a teacher (any OpenAI-compatible chat endpoint) the
    /// three CoT-extraction steps for each note (resumable: notes already in OUT/records.jsonl
    /// are skipped), or take existing teacher records (--from-records); then write the SFT files:
    /// OUT/messages.jsonl (the server's own prompt, the teacher's tags as the answer),
    /// OUT/messages_cot.jsonl (the three steps before the answer) and OUT/tokens.jsonl (prompt
    /// and completion ids for the configured model, for scripts/distill.py). Exits 1 when a note
    /// failed (OUT/failures.jsonl).
    BuildData {
        /// Notes to extract, one JSON object per line: {"note_id", "category", "title", "body",
        /// "images": [local path or file:// URI], "lang"}.
        #[arg(long, required_unless_present = "records", conflicts_with = "records")]
        notes: Option<PathBuf>,
        /// Teacher-record files or directories (the datasets/distill format) instead of a teacher.
        #[arg(long = "from-records", num_args = 1..)]
        records: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Teacher API base URL, e.g. http://127.0.0.1:8000/v1.
        #[arg(long, env = "TAGLLM_TEACHER_URL", required_unless_present = "records")]
        teacher_url: Option<String>,
        /// Teacher model name.
        #[arg(long, env = "TAGLLM_TEACHER_MODEL", default_value = "teacher")]
        teacher_model: String,
        /// Teacher API key (sent as a bearer token).
        #[arg(long, env = "TAGLLM_TEACHER_KEY", hide_env_values = true)]
        teacher_key: Option<String>,
        /// Notes in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Retries per request on connection errors, timeouts, 429 and 5xx (exponential backoff
        /// from 0.5 s, or the server's Retry-After).
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// Answer token limits of steps 1, 2 and 3.
        #[arg(long, value_delimiter = ',', default_values_t = [256u32, 1024, 512])]
        max_tokens: Vec<u32>,
        /// Extract at most this many new notes (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// How steps 2 and 3 ask for their JSON answers: json_schema (OpenAI's structured
        /// outputs: vLLM, SGLang, llama.cpp's server), json_object+schema (llama-cpp-python's
        /// spelling), json_object (any JSON object) or none. A format the server refuses (HTTP
        /// 400/422) is replaced by the next one, with a warning.
        #[arg(long, default_value = "json_schema")]
        response_format: tagllm::teacher::ResponseFormat,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Train a LoRA student from teacher records: writes the SFT files (as `build-data
    /// --from-records`) into OUT/sft, then runs the recipe, scripts/distill.py (PyTorch + PEFT),
    /// on the configured GGUF; the adapter (PEFT format) lands in OUT. Serve it with
    /// `--adapter OUT`, or put it at the model's `.lora` directory. Arguments after `--` go to the
    /// script (e.g. `-- --epochs 6 --device cuda`).
    Distill {
        /// Training records (files or directories in the datasets/distill format).
        #[arg(long = "from-records", required = true, num_args = 1..)]
        records: Vec<PathBuf>,
        /// Held-out records: the answer loss before and after training is reported.
        #[arg(long = "eval-records", num_args = 1..)]
        eval_records: Vec<PathBuf>,
        /// Adapter directory.
        #[arg(long)]
        out: PathBuf,
        /// Python with torch, transformers, peft and gguf (scripts/distill-requirements.txt).
        #[arg(long, env = "TAGLLM_PYTHON", default_value = "python3")]
        python: PathBuf,
        /// The recipe.
        #[arg(long, default_value = "scripts/distill.py")]
        script: PathBuf,
        /// Passed to the script.
        #[arg(last = true)]
        script_args: Vec<String>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Tag one note (a JSON file, `-` for stdin) and print tags and features as JSON; no server,
    /// no store.
    Tag {
        /// Note JSON: {"note_id", "category", "title", "body", "images": [uri...]}.
        note: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// Config file (TOML); `TAGLLM__SECTION__KEY` env vars override it, flags override both.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model: a GGUF file, or a Qwen3-VL checkpoint directory (reads images).
    #[arg(long)]
    model: Option<PathBuf>,
    /// LoRA adapter (PEFT format) merged into the GGUF model: a directory, `auto` (the model's
    /// `.lora` directory when it exists: the default model's distilled student) or `none`.
    #[arg(long)]
    adapter: Option<String>,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long)]
    device: Option<String>,
    /// User Interest Handbook (TOML).
    #[arg(long)]
    handbook: Option<PathBuf>,
    /// Feature schema (TOML).
    #[arg(long)]
    schema: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Listen address.
    #[arg(long)]
    addr: Option<std::net::SocketAddr>,
    /// Store directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

fn load_config(common: &CommonArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::load(common.config.as_deref())?;
    if let Some(m) = &common.model {
        cfg.model.path = m.clone();
    }
    if let Some(d) = &common.device {
        cfg.model.device = d.clone();
    }
    if let Some(a) = &common.adapter {
        cfg.model.adapter = a.clone();
    }
    if let Some(h) = &common.handbook {
        cfg.handbook = h.clone();
    }
    if let Some(s) = &common.schema {
        cfg.schema = s.clone();
    }
    Ok(cfg)
}

/// The configured model, loaded for its tokenizer and chat template (SFT files).
fn tokenizer_model(cfg: &Config) -> anyhow::Result<tagllm::model::TextModel> {
    tagllm::model::TextModel::load(&cfg.model.path, cfg.model.requantize)
        .with_context(|| format!("loading {}", cfg.model.path.display()))
}

/// Writes the SFT files of the teacher records in `sources` into `out`; returns how many
/// examples were written (records that make none are reported on stderr).
fn sft_files(
    model: &tagllm::model::TextModel,
    handbook: &tagllm::handbook::Handbook,
    cfg: &Config,
    sources: &[PathBuf],
    out: &std::path::Path,
) -> anyhow::Result<usize> {
    let records = tagllm::distill::read_records(sources)?;
    let (written, skipped) =
        tagllm::distill::write_sft(&records, handbook, &cfg.limits, Some(model), out)?;
    for s in &skipped {
        eprintln!("not an SFT example: {s}");
    }
    println!(
        "{written} SFT examples from {} records in {}",
        records.len(),
        out.display()
    );
    Ok(written)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            let mut cfg = load_config(&args.common)?;
            if let Some(a) = args.addr {
                cfg.server.addr = a;
            }
            if let Some(d) = args.data_dir {
                cfg.data_dir = d;
            }
            server::init_logging(&cfg.log);
            // Refuse bad config before binding a port.
            cfg.validate()?;
            server::load_guidance(&cfg)?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(cfg.server.addr)
                    .await
                    .with_context(|| format!("binding {}", cfg.server.addr))?;
                server::run(cfg, listener, server::shutdown_signal()).await
            })
        }
        Command::Eval {
            notes,
            decoding,
            verbose,
            common,
        } => {
            let cfg = load_config(&common)?;
            server::init_logging(&cfg.log);
            cfg.validate()?;
            rt.block_on(eval::run(cfg, notes, decoding, verbose))
        }
        Command::Backfill {
            notes,
            addr,
            state,
            failures,
            restart,
            force,
            window,
            retries,
            limit,
            quiet,
            ca_file,
            cert_file,
            key_file,
        } => {
            let opts = tagllm::backfill::BackfillOptions {
                state: state.unwrap_or_else(|| tagllm::backfill::default_state(&notes)),
                failures: failures.unwrap_or_else(|| tagllm::backfill::default_failures(&notes)),
                input: notes,
                addr,
                restart,
                force,
                window,
                retries,
                limit,
                progress: !quiet,
                tls: tagllm::upstream::ClientTls {
                    ca_file,
                    cert_file,
                    key_file,
                },
            };
            let failures = opts.failures.clone();
            match rt.block_on(tagllm::backfill::run(opts, server::shutdown_signal())) {
                Ok(summary) => {
                    println!("{summary}");
                    if summary.failed_total() > 0 {
                        println!("failed notes: {}", failures.display());
                        std::process::exit(1);
                    }
                    Ok(())
                }
                Err(e) => {
                    eprintln!("backfill stopped: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Command::BuildData {
            notes,
            records,
            out,
            teacher_url,
            teacher_model,
            teacher_key,
            concurrency,
            retries,
            timeout_secs,
            max_tokens,
            limit,
            response_format,
            quiet,
            common,
        } => {
            let cfg = load_config(&common)?;
            server::init_logging(&cfg.log);
            cfg.validate()?;
            let (handbook, _schema) = server::load_guidance(&cfg)?;
            let mut failed = 0;
            let sources = match notes {
                Some(notes) => {
                    anyhow::ensure!(
                        max_tokens.len() == 3,
                        "--max-tokens takes three limits, one per step: e.g. 256,1024,512"
                    );
                    let opts = tagllm::teacher::TeacherOptions {
                        url: teacher_url.context("--teacher-url is required with --notes")?,
                        model: teacher_model,
                        api_key: teacher_key,
                        concurrency,
                        retries,
                        timeout: std::time::Duration::from_secs(timeout_secs),
                        max_tokens: [max_tokens[0], max_tokens[1], max_tokens[2]],
                        response_format,
                        limit,
                        progress: !quiet,
                    };
                    let input = tagllm::teacher::read_notes(&notes)?;
                    let summary = rt.block_on(tagllm::teacher::extract_all(
                        input,
                        handbook.clone(),
                        cfg.limits.clone(),
                        opts,
                        &out,
                    ))?;
                    println!("{summary}");
                    failed = summary.failed.len();
                    vec![out.join("records.jsonl")]
                }
                None => records,
            };
            let model = tokenizer_model(&cfg)?;
            sft_files(&model, &handbook, &cfg, &sources, &out)?;
            if failed > 0 {
                println!("failed notes: {}", out.join("failures.jsonl").display());
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Distill {
            records,
            eval_records,
            out,
            python,
            script,
            script_args,
            common,
        } => {
            let cfg = load_config(&common)?;
            server::init_logging(&cfg.log);
            cfg.validate()?;
            anyhow::ensure!(
                !cfg.model.path.is_dir(),
                "distill trains adapters for GGUF models; {} is a checkpoint directory",
                cfg.model.path.display()
            );
            let (handbook, _schema) = server::load_guidance(&cfg)?;
            let model = tokenizer_model(&cfg)?;
            let sft = out.join("sft");
            let mut splits = vec![("train", records)];
            if !eval_records.is_empty() {
                splits.push(("eval", eval_records));
            }
            for (split, sources) in &splits {
                let written = sft_files(&model, &handbook, &cfg, sources, &sft.join(split))?;
                anyhow::ensure!(written > 0, "no {split} example in {sources:?}");
            }
            drop(model);
            let mut cmd = std::process::Command::new(&python);
            cmd.arg(&script)
                .arg("--tokens")
                .arg(sft.join("train/tokens.jsonl"))
                .arg("--gguf")
                .arg(&cfg.model.path)
                .arg("--out")
                .arg(&out);
            if splits.len() > 1 {
                cmd.arg("--eval-tokens").arg(sft.join("eval/tokens.jsonl"));
            }
            let status = cmd
                .args(&script_args)
                .status()
                .with_context(|| format!("running {} {}", python.display(), script.display()))?;
            anyhow::ensure!(status.success(), "{} failed: {status}", script.display());
            println!("adapter: {}", out.display());
            Ok(())
        }
        Command::Tag { note, common } => {
            let cfg = load_config(&common)?;
            server::init_logging(&cfg.log);
            cfg.validate()?;
            let text = if note.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&note)
                    .with_context(|| format!("reading {}", note.display()))?
            };
            let raw: RawNote = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", note.display()))?;
            let note = raw.validate(&cfg.limits)?;
            let (handbook, schema) = server::load_guidance(&cfg)?;
            rt.block_on(async move {
                let (engine, _thread) = server::start_engine(&cfg)?;
                engine.wait_ready().await.map_err(anyhow::Error::msg)?;
                let tagger = Tagger::new(handbook, engine, cfg.limits.clone(), &cfg.model);
                let run = tagger.run(&note).await?;
                let features = schema.features(&run.parsed.tags);
                let groups: serde_json::Map<String, serde_json::Value> = schema
                    .groups
                    .iter()
                    .zip(&features)
                    .map(|(g, f)| (g.name.clone(), serde_json::json!({"ids": f.ids, "weights": f.weights})))
                    .collect();
                let out = serde_json::json!({
                    "note_id": note.id.as_str(),
                    "category": run.handbook_category,
                    "tags": run.parsed.tags,
                    "features": groups,
                    "dropped_tags": run.parsed.dropped.total(),
                    "well_formed": run.parsed.well_formed,
                    "raw_output": run.raw_output,
                    "versions": {"model": run.versions.model, "handbook": run.versions.handbook, "schema": schema.version},
                    "timings": {
                        "prefill_ms": run.timings.prefill_ms,
                        "decode_ms": run.timings.decode_ms,
                        "prompt_tokens": run.timings.prompt_tokens,
                        "generated_tokens": run.timings.generated_tokens,
                    },
                    "warnings": run.warnings,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(())
            })
        }
    }
}
