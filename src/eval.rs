//! `tagllm eval`: tags a set of notes with each decoding mode and reports what the constrained
//! decoding issue asks to see: how many outputs parse, how many hold only handbook dimensions within
//! the limits, how redundant the tags are, and what the constraint costs.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use anyhow::Context;
use tagllm::{
    config::{Config, Decoding},
    domain::RawNote,
    server,
    tagger::Tagger,
};

#[derive(Default)]
struct Totals {
    notes: u32,
    well_formed: u32,
    on_handbook: u32,
    within_limits: u32,
    with_tags: u32,
    tags: u32,
    candidates: u32,
    redundant: u32,
    injected_tag: u32,
    injections: u32,
    prompt_tokens: u64,
    generated_tokens: u64,
    prefill_ms: f64,
    decode_ms: f64,
    mask_us: f64,
    compile_ms: BTreeMap<String, f64>,
}

/// Runs the evaluation and prints a Markdown report.
pub async fn run(
    cfg: Config,
    path: PathBuf,
    modes: Vec<String>,
    verbose: bool,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut notes = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let injection = fields
            .get("injection")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        fields.retain(|k, _| {
            matches!(
                k.as_str(),
                "note_id" | "category" | "title" | "body" | "images" | "updated_at_ms"
            )
        });
        let raw: RawNote = serde_json::from_value(serde_json::Value::Object(fields))
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        notes.push((raw.validate(&cfg.limits)?, injection));
    }
    let (handbook, _schema) = server::load_guidance(&cfg)?;
    let (engine, _thread) = server::start_engine(&cfg)?;
    let info = engine.wait_ready().await.map_err(anyhow::Error::msg)?;
    println!(
        "model {}, {} notes from {}\n",
        info.version,
        notes.len(),
        path.display()
    );
    let mut report = Vec::new();
    for mode in &modes {
        let decoding = match mode.as_str() {
            "constrained" => Decoding::Constrained,
            "unconstrained" => Decoding::Unconstrained,
            other => anyhow::bail!("--decoding: unknown mode {other:?}"),
        };
        let mut model_cfg = cfg.model.clone();
        model_cfg.decoding = decoding;
        let tagger = Tagger::new(
            Arc::clone(&handbook),
            engine.clone(),
            cfg.limits.clone(),
            &model_cfg,
        );
        let mut t = Totals::default();
        for (note, injection) in &notes {
            let run = tagger.run(note).await?;
            let p = &run.parsed;
            t.notes += 1;
            t.well_formed += p.well_formed as u32;
            t.on_handbook += (p.well_formed && p.dropped.off_handbook == 0) as u32;
            t.within_limits += (p.well_formed
                && p.dropped.off_handbook == 0
                && p.dropped.over_limit == 0
                && p.dropped.too_long == 0) as u32;
            t.with_tags += (!p.tags.is_empty()) as u32;
            t.tags += p.tags.len() as u32;
            t.candidates += p.candidates;
            t.redundant += p.redundant;
            if *injection {
                t.injections += 1;
                let bad = p.tags.iter().any(|tag| {
                    let v = tag.value.as_str();
                    v.contains("iphone")
                        || v.contains("免费")
                        || v.contains("free")
                        || v.contains("admin")
                        || v.contains("vip")
                });
                t.injected_tag += bad as u32;
            }
            t.prompt_tokens += run.timings.prompt_tokens as u64;
            t.generated_tokens += run.timings.generated_tokens as u64;
            t.prefill_ms += run.timings.prefill_ms;
            t.decode_ms += run.timings.decode_ms;
            t.mask_us += run.timings.mask_us * run.timings.generated_tokens as f64;
            if run.timings.grammar_compile_ms > 0.0 {
                t.compile_ms.insert(
                    run.handbook_category.clone(),
                    run.timings.grammar_compile_ms,
                );
            }
            if verbose {
                println!(
                    "{}",
                    serde_json::json!({
                        "mode": mode, "note_id": note.id.as_str(), "category": run.handbook_category,
                        "well_formed": p.well_formed, "tags": p.tags, "dropped": p.dropped.total(),
                        "redundant": p.redundant, "raw_output": run.raw_output,
                    })
                );
            }
        }
        report.push((mode.clone(), t));
    }
    let pct = |a: u32, b: u32| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    println!("| decoding | parses | only handbook keys | within limits | notes with tags | tags/note | redundancy | injected tag | prefill tok/s | decode tok/s | constraint µs/token |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (mode, t) in &report {
        println!(
            "| {mode} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.2} | {:.1}% | {}/{} | {:.1} | {:.1} | {:.0} |",
            pct(t.well_formed, t.notes),
            pct(t.on_handbook, t.notes),
            pct(t.within_limits, t.notes),
            pct(t.with_tags, t.notes),
            t.tags as f64 / t.notes.max(1) as f64,
            pct(t.redundant, t.candidates),
            t.injected_tag,
            t.injections,
            t.prompt_tokens as f64 / t.prefill_ms * 1e3,
            t.generated_tokens as f64 / t.decode_ms * 1e3,
            t.mask_us / t.generated_tokens.max(1) as f64,
        );
    }
    for (mode, t) in &report {
        if !t.compile_ms.is_empty() {
            let list: Vec<String> = t
                .compile_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} ms"))
                .collect();
            println!(
                "\n{mode}: grammar compile time per category: {}",
                list.join(", ")
            );
        }
    }
    Ok(())
}
