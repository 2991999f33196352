//! The command line: one file per subcommand, each with its arguments and its `run`. What they
//! share is here: the config flags every model-using subcommand takes, and loading the config
//! the same way for all of them (defaults, file, env, flags; then logging; then validation,
//! before anything binds a port or loads a model).

mod backfill;
mod build_data;
mod distill;
mod eval;
mod serve;
mod tag;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tagllm::{config::Config, server};

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
    Serve(serve::ServeArgs),
    /// Tag every note of a JSONL file with each decoding mode and report output validity,
    /// redundancy and speed (no server, no store).
    Eval(eval::EvalArgs),
    /// Tag every note of a JSONL file through a running server's TagNotes stream, with a
    /// progress bar; resumable (acknowledged ids go to a state file and are skipped next time).
    /// Exits 1 when any note failed (see the failure file), 2 on a broken run.
    Backfill(backfill::BackfillArgs),
    /// Build a tag-distillation dataset: ask a teacher (any OpenAI-compatible chat endpoint) the
    /// three CoT-extraction steps for each note (resumable: notes already in OUT/records.jsonl
    /// are skipped), or take existing teacher records (--from-records); then write the SFT files:
    /// OUT/messages.jsonl (the server's own prompt, the teacher's tags as the answer),
    /// OUT/messages_cot.jsonl (the three steps before the answer) and OUT/tokens.jsonl (prompt
    /// and completion ids for the configured model, for scripts/distill.py). Exits 1 when a note
    /// failed (OUT/failures.jsonl).
    BuildData(build_data::BuildDataArgs),
    /// Train a LoRA student from teacher records: writes the SFT files (as `build-data
    /// --from-records`) into OUT/sft, then runs the recipe, scripts/distill.py (PyTorch + PEFT),
    /// on the configured GGUF; the adapter (PEFT format) lands in OUT. Serve it with
    /// `--adapter OUT`, or put it at the model's `.lora` directory. Arguments after `--` go to the
    /// script (e.g. `-- --epochs 6 --device cuda`).
    Distill(distill::DistillArgs),
    /// Tag one note (a JSON file, `-` for stdin) and print tags and features as JSON; no server,
    /// no store.
    Tag(tag::TagArgs),
}

/// Config flags that every subcommand running the model takes.
#[derive(Args)]
pub struct CommonArgs {
    /// Config file (TOML); `TAGLLM__SECTION__KEY` env vars override it, flags override both.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: a GGUF file, or a Qwen3-VL checkpoint directory (reads images).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// LoRA adapter (PEFT format) merged into the GGUF model: a directory, `auto` (the model's
    /// `.lora` directory when it exists: the default model's distilled student) or `none`.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Prompt style: full (the handbook's guidance), compact (the category's name; for students
    /// distilled on it) or auto (what the adapter was trained on, else full).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long)]
    pub device: Option<String>,
    /// User Interest Handbook (TOML).
    #[arg(long)]
    pub handbook: Option<PathBuf>,
    /// Feature schema (TOML).
    #[arg(long)]
    pub schema: Option<PathBuf>,
}

impl CommonArgs {
    /// The config: defaults, the `--config` file, `TAGLLM__` env, these flags, then `adjust`
    /// (a subcommand's own flags); logging starts, and the result is validated.
    pub fn config(&self, adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if let Some(m) = &self.model {
            cfg.model.path = m.clone();
        }
        if let Some(d) = &self.device {
            cfg.model.device = d.clone();
        }
        if let Some(a) = &self.adapter {
            cfg.model.adapter = a.clone();
        }
        if let Some(p) = &self.prompt {
            cfg.model.prompt = p.clone();
        }
        if let Some(h) = &self.handbook {
            cfg.handbook = h.clone();
        }
        if let Some(s) = &self.schema {
            cfg.schema = s.clone();
        }
        adjust(&mut cfg);
        server::init_logging(&cfg.log);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Parses the command line and runs the subcommand on a multi-threaded Tokio runtime.
pub fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match Cli::parse().command {
        Command::Serve(args) => serve::run(args, &rt),
        Command::Eval(args) => eval::run(args, &rt),
        Command::Backfill(args) => backfill::run(args, &rt),
        Command::BuildData(args) => build_data::run(args, &rt),
        Command::Distill(args) => distill::run(args, &rt),
        Command::Tag(args) => tag::run(args, &rt),
    }
}
