//! `tagllm eval`: tags a set of notes with each decoding mode and reports what the constrained
//! decoding issue asks to see: how many outputs parse, how many hold only handbook dimensions within
//! the limits, how redundant the tags are, and what the constraint costs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use clap::Args;
use tagllm::{
    config::Config,
    domain::{canonical::Canonical, normalize, Note, RawNote, Tag},
    server,
    tagging::tagger::{Decoding, TagRun, Tagger},
    training::distill::{read_records, reference_tags, TeacherSteps},
};

use super::CommonArgs;

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

/// Tag-quality counts against reference tags, for one slice (all notes, a category, a dimension).
#[derive(Default, Clone, Copy)]
struct Score {
    /// Predicted tags.
    pred: u32,
    /// Reference tags.
    reference: u32,
    /// Predicted tags equal (after normalization) to a reference tag of the same dimension.
    exact: u32,
    /// Predicted tags that contain or are contained in a reference tag of the same dimension.
    lenient_pred: u32,
    /// Reference tags that contain or are contained in a predicted tag of the same dimension.
    lenient_ref: u32,
}

impl Score {
    fn add(&mut self, o: &Score) {
        self.pred += o.pred;
        self.reference += o.reference;
        self.exact += o.exact;
        self.lenient_pred += o.lenient_pred;
        self.lenient_ref += o.lenient_ref;
    }

    /// (precision, recall, F1) in percent, exact and lenient.
    fn prf(&self) -> [(f64, f64, f64); 2] {
        let f = |tp_p: u32, tp_r: u32| {
            let p = if self.pred == 0 {
                0.0
            } else {
                tp_p as f64 / self.pred as f64
            };
            let r = if self.reference == 0 {
                0.0
            } else {
                tp_r as f64 / self.reference as f64
            };
            let f1 = if p + r == 0.0 {
                0.0
            } else {
                2.0 * p * r / (p + r)
            };
            (100.0 * p, 100.0 * r, 100.0 * f1)
        };
        [
            f(self.exact, self.exact),
            f(self.lenient_pred, self.lenient_ref),
        ]
    }
}

/// Scores of one decoding mode: overall, per handbook entry, per dimension key.
#[derive(Default)]
struct Quality {
    notes: u32,
    all: Score,
    by_category: BTreeMap<String, Score>,
    by_dimension: BTreeMap<String, Score>,
    grounding: Grounding,
}

/// Whether the tags stay within what the note says, on notes with reference tags. A student can
/// score recall while inventing; these count the inventions the issue tracker found.
#[derive(Default)]
struct Grounding {
    /// Notes of a category with a price dimension whose reference has no price tag (the note
    /// states no price), and those of them given a price tag anyway.
    no_price: u32,
    priced_anyway: u32,
    /// Notes whose reference has at most one tag (near-empty or off-topic notes), the tags
    /// predicted for them, and those of them given more than one.
    sparse: u32,
    sparse_tags: u32,
    sparse_over_one: u32,
    /// Notes whose reference has no tag at all (nothing to tag: an emoji title, an off-topic
    /// note, an injection), and those of them answered with no tag.
    empty: u32,
    empty_untagged: u32,
    /// Predicted tags of the extractive dimensions ([`EXTRACTIVE`]) with a Chinese character
    /// the note does not contain, and the same count for the reference tags (the teacher's own
    /// rate, as a yardstick).
    unsupported: u32,
    tags: u32,
    ref_unsupported: u32,
    ref_tags: u32,
}

/// The price dimension's key in the handbook.
const PRICE: &str = "price_band";

/// Dimensions whose values name what the note names (a brand, a model, a dish, a place), so a
/// Chinese character the note lacks is an invention. Open-ended dimensions (scene, style, ...)
/// rightly use words of their own.
const EXTRACTIVE: &[&str] = &[
    "brand",
    "series",
    "colorway",
    "shade",
    "dial",
    "dish",
    "poi",
    "location",
    "destination",
];

/// Whether `c` is a CJK ideograph (the characters a garbled Chinese value invents).
fn is_han(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FFFF)
}

/// Whether `value` has a Chinese character that `text` (normalized) does not contain.
fn has_unsupported_han(value: &str, text: &str) -> bool {
    value.chars().any(|c| is_han(c) && !text.contains(c))
}

impl Grounding {
    fn add(&mut self, note: &Note, has_price_dim: bool, pred: &[Tag], reference: &[Tag]) {
        let text = normalize(&format!("{} {}", note.title, note.body));
        if has_price_dim && !reference.iter().any(|t| t.dimension == PRICE) {
            self.no_price += 1;
            self.priced_anyway += pred.iter().any(|t| t.dimension == PRICE) as u32;
        }
        if reference.len() <= 1 {
            self.sparse += 1;
            self.sparse_tags += pred.len() as u32;
            self.sparse_over_one += (pred.len() > 1) as u32;
        }
        if reference.is_empty() {
            self.empty += 1;
            self.empty_untagged += pred.is_empty() as u32;
        }
        let extractive = |tags: &[Tag]| -> (u32, u32) {
            let named: Vec<&Tag> = tags
                .iter()
                .filter(|t| EXTRACTIVE.contains(&t.dimension.as_str()))
                .collect();
            let invented = named
                .iter()
                .filter(|t| has_unsupported_han(&t.value, &text))
                .count();
            (named.len() as u32, invented as u32)
        };
        let (n, bad) = extractive(pred);
        self.tags += n;
        self.unsupported += bad;
        let (n, bad) = extractive(reference);
        self.ref_tags += n;
        self.ref_unsupported += bad;
    }
}

impl Quality {
    fn add(&mut self, category: &str, per_dim: BTreeMap<String, Score>) {
        self.notes += 1;
        for (dim, s) in per_dim {
            self.all.add(&s);
            self.by_category
                .entry(category.to_string())
                .or_default()
                .add(&s);
            self.by_dimension.entry(dim).or_default().add(&s);
        }
    }
}

fn print_scores<'a>(title: &str, rows: impl Iterator<Item = (&'a str, &'a Score)>) {
    println!("\n{title}\n");
    println!("| slice | tags (pred / ref) | P | R | F1 | lenient P | lenient R | lenient F1 |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, s) in rows {
        let [(p, r, f), (lp, lr, lf)] = s.prf();
        println!(
            "| {name} | {} / {} | {p:.1} | {r:.1} | **{f:.1}** | {lp:.1} | {lr:.1} | {lf:.1} |",
            s.pred, s.reference
        );
    }
}

/// `a` of `b`, in percent (0 when `b` is 0).
fn pct(a: u32, b: u32) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// Prints the scores against the reference and the grounding counts of one mode.
fn print_quality(mode: &str, q: &Quality) {
    if q.notes == 0 {
        return;
    }
    print_scores(
        &format!(
            "{mode}: tags against the reference ({} notes; % exact after normalization, lenient = containment)",
            q.notes
        ),
        std::iter::once(("all", &q.all))
            .chain(q.by_category.iter().map(|(k, v)| (k.as_str(), v))),
    );
    print_scores(
        &format!("{mode}: by dimension"),
        q.by_dimension.iter().map(|(k, v)| (k.as_str(), v)),
    );
    let g = &q.grounding;
    println!("\n{mode}: grounding\n");
    println!("| notes stating no price, given a price tag | notes with at most 1 reference tag: tags/note, notes given more than 1 | notes with no reference tag answered with none | brand/model/place/dish tags with a Chinese character the note lacks (reference) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {}/{} ({:.1}%) | {:.2}, {}/{} | {}/{} | {}/{} ({:.1}%; reference {}/{}) |",
        g.priced_anyway,
        g.no_price,
        pct(g.priced_anyway, g.no_price),
        g.sparse_tags as f64 / g.sparse.max(1) as f64,
        g.sparse_over_one,
        g.sparse,
        g.empty_untagged,
        g.empty,
        g.unsupported,
        g.tags,
        pct(g.unsupported, g.tags),
        g.ref_unsupported,
        g.ref_tags,
    );
}

/// Whether two normalized values of one dimension match leniently: one contains the other once
/// spaces are removed ("air jordan 1" and "aj1" do not; "dunk low" and "nike dunk low" do).
fn lenient_match(a: &str, b: &str) -> bool {
    let a: String = a.chars().filter(|c| !c.is_whitespace()).collect();
    let b: String = b.chars().filter(|c| !c.is_whitespace()).collect();
    !a.is_empty() && !b.is_empty() && (a.contains(&b) || b.contains(&a))
}

/// Scores `pred` against `reference` per dimension; returns the per-dimension scores.
fn score_note(pred: &[Tag], reference: &[Tag]) -> BTreeMap<String, Score> {
    let mut out: BTreeMap<String, Score> = BTreeMap::new();
    for t in pred {
        let s = out.entry(t.dimension.clone()).or_default();
        s.pred += 1;
        let same_dim = || reference.iter().filter(|r| r.dimension == t.dimension);
        s.exact += same_dim().any(|r| r.value == t.value) as u32;
        s.lenient_pred += same_dim().any(|r| lenient_match(&r.value, &t.value)) as u32;
    }
    for r in reference {
        let s = out.entry(r.dimension.clone()).or_default();
        s.reference += 1;
        s.lenient_ref += pred
            .iter()
            .any(|t| t.dimension == r.dimension && lenient_match(&r.value, &t.value))
            as u32;
    }
    out
}

/// The synonyms tags are compared under: the schema's, unless `raw`; says which.
fn comparison(schema: &tagllm::features::Schema, raw: bool) -> Canonical {
    if raw || schema.canonical.dimensions().next().is_none() {
        println!("tags compared as written (normalized)\n");
        return Canonical::none();
    }
    let mut dims: Vec<&str> = schema.canonical.dimensions().collect();
    dims.sort();
    println!(
        "tags compared in canonical spelling (the feature schema's synonyms for {}; --raw: as written)\n",
        dims.join(", ")
    );
    schema.canonical.clone()
}

/// One note to tag, with what the report needs about it.
struct Item {
    note: Note,
    injection: bool,
    /// The teacher's tags when the line is a teacher record (`datasets/distill` format).
    reference: Option<BTreeMap<String, Vec<String>>>,
}

fn read_items(path: &Path, cfg: &Config) -> anyhow::Result<Vec<Item>> {
    let files = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        f.sort();
        f
    } else {
        vec![path.to_path_buf()]
    };
    let mut items = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let at = || format!("{} line {}", file.display(), i + 1);
            let fields: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).with_context(at)?;
            let injection = fields
                .get("injection")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let reference = match fields.get("teacher") {
                Some(t) => Some(
                    serde_json::from_value::<TeacherSteps>(t.clone())
                        .with_context(at)?
                        .tags,
                ),
                None => None,
            };
            let raw = RawNote::from_json_fields(fields).with_context(at)?;
            items.push(Item {
                note: raw.validate(&cfg.limits).with_context(at)?,
                injection,
                reference,
            });
        }
    }
    anyhow::ensure!(!items.is_empty(), "no notes in {}", path.display());
    Ok(items)
}

/// Arguments of `tagllm eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Notes, one JSON object per line: files, or directories of such files (extra fields such
    /// as `injection` are read for the report; teacher records, the `datasets/distill` format,
    /// are also scored against their tags: precision, recall and F1).
    #[arg(required = true, num_args = 1..)]
    pub notes: Vec<PathBuf>,
    /// Decoding modes to compare.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["constrained".to_string(), "unconstrained".to_string()])]
    pub decoding: Vec<String>,
    /// Print one JSON line per note too.
    #[arg(long)]
    pub verbose: bool,
    /// Score these teacher records (files or directories, matched by note id) against the notes'
    /// reference tags instead of running the model: a second teacher's annotation of the same
    /// notes gives the teacher-vs-teacher agreement, the ceiling a student can reach.
    #[arg(long, num_args = 1..)]
    pub against: Vec<PathBuf>,
    /// Compare tags as written, not in the canonical spellings of the feature schema's synonym
    /// files (by default `commute` and `通勤` match, as they share a feature id).
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Runs the evaluation.
pub fn run(args: EvalArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let cfg = args.common.config(|_| {})?;
    if !args.against.is_empty() {
        return agreement(&cfg, &args.notes, &args.against, args.raw);
    }
    rt.block_on(evaluate(
        cfg,
        args.notes,
        args.decoding,
        args.verbose,
        args.raw,
    ))
}

/// Scores the tags of the `against` records as predictions for the notes of `paths` (their
/// teacher records), with the same scores and grounding counts a model gets.
fn agreement(
    cfg: &Config,
    paths: &[PathBuf],
    against: &[PathBuf],
    raw: bool,
) -> anyhow::Result<()> {
    let (handbook, schema) = server::load_guidance(cfg)?;
    let canonical = comparison(&schema, raw);
    let others: BTreeMap<String, BTreeMap<String, Vec<String>>> = read_records(against)?
        .into_iter()
        .map(|r| (r.note_id, r.teacher.tags))
        .collect();
    let mut q = Quality::default();
    let mut missing = Vec::new();
    for path in paths {
        for item in read_items(path, cfg)? {
            let Some(reference) = &item.reference else {
                continue;
            };
            let Some(other) = others.get(item.note.id.as_str()) else {
                missing.push(item.note.id.as_str().to_string());
                continue;
            };
            let category = handbook.resolve(&item.note.category);
            let (pred, reference) = (
                reference_tags(other, category),
                reference_tags(reference, category),
            );
            q.add(
                &category.key,
                score_note(&canonical.tags(&pred), &canonical.tags(&reference)),
            );
            // Grounding reads the tags as written: a canonical spelling in another script is
            // no invention.
            let has_price = category.dimensions.iter().any(|d| d.key == PRICE);
            q.grounding.add(&item.note, has_price, &pred, &reference);
        }
    }
    anyhow::ensure!(
        missing.is_empty(),
        "{} notes have no record to compare, e.g. {}",
        missing.len(),
        missing[..missing.len().min(5)].join(", ")
    );
    print_quality("agreement", &q);
    Ok(())
}

/// Runs the evaluation and prints a Markdown report. `paths` are JSONL files or directories of
/// them; lines in the teacher-record format (`datasets/distill`) are also scored against their tags.
async fn evaluate(
    cfg: Config,
    paths: Vec<PathBuf>,
    modes: Vec<String>,
    verbose: bool,
    raw: bool,
) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for path in &paths {
        items.extend(read_items(path, &cfg)?);
    }
    let items = Arc::new(items);
    let (handbook, schema) = server::load_guidance(&cfg)?;
    let canonical = comparison(&schema, raw);
    let (engine, _thread) = server::start_engine(&cfg)?;
    let info = engine.wait_ready().await.map_err(anyhow::Error::msg)?;
    let scored = items.iter().filter(|i| i.reference.is_some()).count();
    println!(
        "model {}, {} notes from {} ({scored} with reference tags)\n",
        info.version,
        items.len(),
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Notes run concurrently so the engine can batch them; results are read back in input order.
    let prompt = cfg.model.prompt_style().map_err(anyhow::Error::msg)?;
    let window = cfg
        .model
        .max_batch
        .clamp(1, cfg.model.queue_capacity.max(1));
    let mut report = Vec::new();
    let mut quality = Vec::new();
    for mode in &modes {
        let decoding = match mode.as_str() {
            "constrained" => Decoding::Constrained,
            "unconstrained" => Decoding::Unconstrained,
            other => anyhow::bail!("--decoding: unknown mode {other:?}"),
        };
        let tagger = Arc::new(
            Tagger::new(
                Arc::clone(&handbook),
                engine.clone(),
                cfg.limits.clone(),
                decoding,
                cfg.model.max_new_tokens,
            )
            .with_prompt(prompt),
        );
        let progress = indicatif::ProgressBar::new(items.len() as u64).with_message(mode.clone());
        let sem = Arc::new(tokio::sync::Semaphore::new(window));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..items.len() {
            let (tagger, items, sem) = (Arc::clone(&tagger), Arc::clone(&items), Arc::clone(&sem));
            let permit = sem.acquire_owned().await?;
            tasks.spawn(async move {
                let r = tagger.run(&items[i].note).await;
                drop(permit);
                (i, r)
            });
        }
        let mut runs: Vec<Option<TagRun>> = (0..items.len()).map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            let (i, r) = done?;
            runs[i] = Some(r.with_context(|| format!("note {}", items[i].note.id.as_str()))?);
            progress.inc(1);
        }
        progress.finish_and_clear();
        let mut q = Quality::default();
        let mut t = Totals::default();
        for (item, run) in items.iter().zip(runs.iter().flatten()) {
            let (note, injection) = (&item.note, &item.injection);
            let p = &run.parsed;
            if let Some(reference) = &item.reference {
                let category = handbook.resolve(&note.category);
                let record_tags = reference_tags(reference, category);
                q.add(
                    &category.key,
                    score_note(&canonical.tags(&p.tags), &canonical.tags(&record_tags)),
                );
                let has_price = category.dimensions.iter().any(|d| d.key == PRICE);
                q.grounding.add(note, has_price, &p.tags, &record_tags);
            }
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
        quality.push((mode.clone(), q));
    }
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
    for (mode, q) in &quality {
        print_quality(mode, q);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(dimension: &str, value: &str) -> Tag {
        Tag {
            dimension: dimension.into(),
            value: value.into(),
            score: 1.0,
        }
    }

    fn note(title: &str, body: &str) -> Note {
        RawNote {
            note_id: "n".into(),
            category: "sneakers".into(),
            title: title.into(),
            body: body.into(),
            ..Default::default()
        }
        .validate(&tagllm::domain::Limits::default())
        .unwrap()
    }

    #[test]
    fn grounding_counts_prices_sparse_notes_and_invented_characters() {
        let mut g = Grounding::default();
        // No price stated, one given; the reference is sparse, the prediction is not; 鞋 is in the
        // note, 耐 is not.
        let n = note("🥰", "新鞋 #aj1");
        let pred = [
            tag(PRICE, "¥500-1000"),
            tag("series", "耐克鞋"),
            tag("series", "aj1"),
        ];
        g.add(&n, true, &pred, &[tag("series", "aj1")]);
        // A price stated and tagged; nothing invented.
        let n = note("Dunk Low", "799入手，脚感一般");
        let both = [tag(PRICE, "¥500-1000"), tag("wearing_feel", "脚感一般")];
        g.add(&n, true, &both, &both);
        assert_eq!((g.priced_anyway, g.no_price), (1, 1));
        assert_eq!((g.sparse, g.sparse_tags, g.sparse_over_one), (1, 3, 1));
        assert_eq!((g.empty, g.empty_untagged), (0, 0));
        // Only the extractive dimensions count: series here, not price or wearing feel.
        assert_eq!((g.unsupported, g.tags), (1, 2));
        assert_eq!((g.ref_unsupported, g.ref_tags), (0, 1));
        // Latin, digits and symbols never count: canonical brand spellings are not inventions.
        assert!(!has_unsupported_han("Nike ¥0-50", "耐克"));
        assert!(has_unsupported_han("始祖鸟", "Arc'teryx 始祖"));
        // Nothing to tag: answered with no tag, then with one.
        g.add(&note("😭😭😭", "如题"), true, &[], &[]);
        g.add(&note("晚安", ""), true, &[tag("series", "aj1")], &[]);
        assert_eq!((g.empty, g.empty_untagged), (2, 1));
    }
}
