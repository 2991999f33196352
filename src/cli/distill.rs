//! `tagllm distill`: SFT files from teacher records, then the LoRA recipe (scripts/distill.py).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tagllm::{
    config::Config,
    features::Schema,
    model::TextModel,
    server,
    tagging::handbook::Handbook,
    training::{self, distill::SftOptions},
};

use super::CommonArgs;

/// Arguments of `tagllm distill`.
#[derive(Args)]
pub struct DistillArgs {
    /// Training records (files or directories in the datasets/distill format).
    #[arg(long = "from-records", required = true, num_args = 1..)]
    pub records: Vec<PathBuf>,
    /// Held-out records: the answer loss before and after training is reported.
    #[arg(long = "eval-records", num_args = 1..)]
    pub eval_records: Vec<PathBuf>,
    /// Adapter directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Python with torch, transformers, peft and gguf (scripts/distill-requirements.txt).
    #[arg(long, env = "TAGLLM_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// The recipe.
    #[arg(long, default_value = "scripts/distill.py")]
    pub script: PathBuf,
    /// Passed to the script.
    #[arg(last = true)]
    pub script_args: Vec<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The configured model, loaded for its tokenizer and chat template (SFT files).
pub(super) fn tokenizer_model(cfg: &Config) -> anyhow::Result<TextModel> {
    TextModel::load(&cfg.model.path, cfg.model.requantize)
        .with_context(|| format!("loading {}", cfg.model.path.display()))
}

/// Writes the SFT files of the teacher records in `sources` into `out`; returns how many
/// examples were written (records that make none are reported on stderr).
pub(super) fn sft_files(
    model: &TextModel,
    (handbook, schema): (&Handbook, &Schema),
    cfg: &Config,
    sources: &[PathBuf],
    out: &Path,
) -> anyhow::Result<usize> {
    let records = training::distill::read_records(sources)?;
    let opts = SftOptions {
        style: cfg.model.prompt_style().map_err(anyhow::Error::msg)?,
        canonical: schema.canonical.clone(),
    };
    let (written, skipped) =
        training::distill::write_sft(&records, handbook, &cfg.limits, &opts, Some(model), out)?;
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

/// Writes the SFT splits, then runs the recipe on them.
pub fn run(args: DistillArgs, _rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let DistillArgs {
        records,
        eval_records,
        out,
        python,
        script,
        script_args,
        common,
    } = args;
    let cfg = common.config(|_| {})?;
    anyhow::ensure!(
        !cfg.model.path.is_dir(),
        "distill trains adapters for GGUF models; {} is a checkpoint directory",
        cfg.model.path.display()
    );
    let (handbook, schema) = server::load_guidance(&cfg)?;
    let model = tokenizer_model(&cfg)?;
    let sft = out.join("sft");
    let mut splits = vec![("train", records)];
    if !eval_records.is_empty() {
        splits.push(("eval", eval_records));
    }
    for (split, sources) in &splits {
        let written = sft_files(
            &model,
            (&handbook, &schema),
            &cfg,
            sources,
            &sft.join(split),
        )?;
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
    // What the server needs to know of the adapter: the prompt style it was trained on
    // (`model.prompt = "auto"` reads it).
    let style = cfg.model.prompt_style().map_err(anyhow::Error::msg)?;
    let meta = out.join("tagllm.json");
    std::fs::write(
        &meta,
        format!("{:#}\n", serde_json::json!({ "prompt": style.as_str() })),
    )
    .with_context(|| format!("writing {}", meta.display()))?;
    println!("adapter: {}", out.display());
    Ok(())
}
