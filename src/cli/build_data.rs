//! `tagllm build-data`: teacher data (the three steps against an OpenAI-compatible endpoint),
//! then the SFT files.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tagllm::{server, training::teacher};

use super::{
    distill::{sft_files, tokenizer_model},
    CommonArgs,
};

/// Arguments of `tagllm build-data`.
#[derive(Args)]
pub struct BuildDataArgs {
    /// Notes to extract, one JSON object per line: {"note_id", "category", "title", "body",
    /// "images": [local path or file:// URI], "lang"}.
    #[arg(long, required_unless_present = "records", conflicts_with = "records")]
    pub notes: Option<PathBuf>,
    /// Teacher-record files or directories (the datasets/distill format) instead of a teacher.
    #[arg(long = "from-records", num_args = 1..)]
    pub records: Vec<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Teacher API base URL, e.g. http://127.0.0.1:8000/v1.
    #[arg(long, env = "TAGLLM_TEACHER_URL", required_unless_present = "records")]
    pub teacher_url: Option<String>,
    /// Teacher model name.
    #[arg(long, env = "TAGLLM_TEACHER_MODEL", default_value = "teacher")]
    pub teacher_model: String,
    /// Teacher API key (sent as a bearer token).
    #[arg(long, env = "TAGLLM_TEACHER_KEY", hide_env_values = true)]
    pub teacher_key: Option<String>,
    /// Notes in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Retries per request on connection errors, timeouts, 429 and 5xx (exponential backoff
    /// from 0.5 s, or the server's Retry-After).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Answer token limits of steps 1, 2 and 3.
    #[arg(long, value_delimiter = ',', default_values_t = [256u32, 1024, 512])]
    pub max_tokens: Vec<u32>,
    /// Extract at most this many new notes (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// How steps 2 and 3 ask for their JSON answers: json_schema (OpenAI's structured
    /// outputs: vLLM, SGLang, llama.cpp's server), json_object+schema (llama-cpp-python's
    /// spelling), json_object (any JSON object) or none. A format the server refuses (HTTP
    /// 400/422) is replaced by the next one, with a warning.
    #[arg(long, default_value = "json_schema")]
    pub response_format: teacher::ResponseFormat,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Extracts (or reads) the records and writes the SFT files; exits 1 when a note failed.
pub fn run(args: BuildDataArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let BuildDataArgs {
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
    } = args;
    let cfg = common.config(|_| {})?;
    let (handbook, schema) = server::load_guidance(&cfg)?;
    let mut failed = 0;
    let sources = match notes {
        Some(notes) => {
            anyhow::ensure!(
                max_tokens.len() == 3,
                "--max-tokens takes three limits, one per step: e.g. 256,1024,512"
            );
            let opts = teacher::TeacherOptions {
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
            let input = teacher::read_notes(&notes)?;
            let summary = rt.block_on(teacher::extract_all(
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
    sft_files(&model, (&handbook, &schema), &cfg, &sources, &out)?;
    if failed > 0 {
        println!("failed notes: {}", out.join("failures.jsonl").display());
        std::process::exit(1);
    }
    Ok(())
}
