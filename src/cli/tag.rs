//! `tagllm tag`: tag one note and print its tags and features as JSON, with no server and no
//! store.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tagllm::{domain::RawNote, server, tagging::tagger::Tagger};

use super::CommonArgs;

/// Arguments of `tagllm tag`.
#[derive(Args)]
pub struct TagArgs {
    /// Note JSON: {"note_id", "category", "title", "body", "images": [uri...]}.
    pub note: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Loads the model, tags the note once, prints the result.
pub fn run(args: TagArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let TagArgs { note, common } = args;
    let cfg = common.config(|_| {})?;
    let text = if note.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&note).with_context(|| format!("reading {}", note.display()))?
    };
    let raw: RawNote =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", note.display()))?;
    let note = raw.validate(&cfg.limits)?;
    let (handbook, schema) = server::load_guidance(&cfg)?;
    rt.block_on(async move {
        let (engine, _thread) = server::start_engine(&cfg)?;
        engine.wait_ready().await.map_err(anyhow::Error::msg)?;
        let tagger = Tagger::new(
            handbook,
            engine,
            cfg.limits.clone(),
            cfg.model.decoding,
            cfg.model.max_new_tokens,
        )
        .with_prompt(cfg.model.prompt_style().map_err(anyhow::Error::msg)?);
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
