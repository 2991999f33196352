//! `tagllm build-data`: multimodal CoT extraction (TagLLM, arXiv 2603.21481) against any
//! OpenAI-compatible chat endpoint. For each note the teacher is asked, in one conversation, three
//! things, each prompt built from the note and its category's handbook entry:
//!
//! 1. **about**: what the note (text and images) is about, and what a reader interested in it
//!    looks for;
//! 2. **candidates**: for each handbook dimension, candidate values with their evidence (JSON);
//! 3. **consolidate**: the final fine-grained tags (JSON), from the candidates only.
//!
//! The answers are checked like a model's output is when serving: only the category's dimensions,
//! at most `max_tags_per_dimension` tags per dimension and `max_tags_per_note` in all, each at most
//! `max_tag_chars` characters, no repeats, and every tag among its dimension's candidates (an
//! ungrounded tag is dropped). Steps 2 and 3 send their answer's JSON schema as a structured
//! output ([`schema`]): step 2's names the category's dimensions and bounds every value, step 3's
//! allows only step 2's candidates, so a teacher that honours it writes a parseable, grounded
//! answer (unless cut at its token limit); a server that refuses the schema's spelling is asked
//! again in a weaker one ([`ResponseFormat`]), once per run. Results are appended to
//! `records.jsonl` as they finish (the `datasets/distill` format), so a stopped run resumes where
//! it was: notes already there are skipped. Failures (after retries) go to `failures.jsonl`,
//! rewritten each run.

mod client;
pub mod prompts;
pub mod schema;

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use serde_json::{json, Value};

pub use schema::ResponseFormat;

use crate::{
    domain::Limits,
    domain::RawNote,
    tagging::handbook::Handbook,
    training::distill::{TeacherRecord, TeacherSteps},
};

/// How to reach the teacher and how hard to push it.
#[derive(Debug, Clone)]
pub struct TeacherOptions {
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8000/v1`; requests go to
    /// `{url}/chat/completions`.
    pub url: String,
    /// Model name sent with each request.
    pub model: String,
    /// Bearer token, if the endpoint needs one.
    pub api_key: Option<String>,
    /// Notes in flight at once.
    pub concurrency: usize,
    /// Retries per request on connection errors, timeouts, 429 and 5xx, with exponential backoff.
    pub retries: u32,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Token limits of the three steps' answers.
    pub max_tokens: [u32; 3],
    /// The strongest way to ask for steps 2 and 3's answer shape; weakened at the server's
    /// first refusal.
    pub response_format: ResponseFormat,
    /// Extract at most this many new notes (0: all).
    pub limit: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct BuildSummary {
    /// Notes extracted in this run.
    pub done: usize,
    /// Notes already in `records.jsonl`, not asked again.
    pub skipped: usize,
    /// Notes that failed: (note id, reason).
    pub failed: Vec<(String, String)>,
}

impl std::fmt::Display for BuildSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} extracted, {} already done, {} failed",
            self.done,
            self.skipped,
            self.failed.len()
        )?;
        // Grouped by the step and the kind of failure ("step 2: HTTP 500 Internal Server
        // Error"), without the details after that.
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, r) in &self.failed {
            let kind = r
                .match_indices(": ")
                .nth(1)
                .map_or(r.as_str(), |(i, _)| &r[..i]);
            *reasons.entry(kind).or_default() += 1;
        }
        for (r, n) in reasons {
            write!(f, "\n  {n} x {r}")?;
        }
        Ok(())
    }
}

/// A note to extract, as read from the input JSONL.
#[derive(Debug, Clone)]
pub struct InputNote {
    /// The note, as a client sends it.
    pub raw: RawNote,
    /// `zh`, `en` or `mixed`, when the input says.
    pub lang: String,
}

/// Reads notes (`{"note_id", "category", "title", "body", "images": [path or file:// URI],
/// "lang"}`; other fields are ignored) from a JSONL file.
pub fn read_notes(path: &Path) -> anyhow::Result<Vec<InputNote>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{} line {}", path.display(), i + 1);
        let fields: serde_json::Map<String, Value> = serde_json::from_str(line).with_context(at)?;
        let lang = fields
            .get("lang")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let raw = RawNote::from_json_fields(fields).with_context(at)?;
        out.push(InputNote { raw, lang });
    }
    Ok(out)
}

/// Note ids already in `records.jsonl` (a torn last line, from a run that was killed mid-write,
/// is ignored and that note is asked again).
fn done_ids(records: &Path) -> anyhow::Result<HashSet<String>> {
    let Ok(text) = std::fs::read_to_string(records) else {
        return Ok(HashSet::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<TeacherRecord>(l).ok())
        .map(|r| r.note_id)
        .collect())
}

/// Extracts every note of `notes` not yet in `out/records.jsonl` and appends the results there.
pub async fn extract_all(
    notes: Vec<InputNote>,
    handbook: Arc<Handbook>,
    limits: Limits,
    opts: TeacherOptions,
    out: &Path,
) -> anyhow::Result<BuildSummary> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let records_path = out.join("records.jsonl");
    let done = done_ids(&records_path)?;
    let mut summary = BuildSummary::default();
    let mut todo = Vec::new();
    let mut seen = HashSet::new();
    for n in notes {
        if done.contains(&n.raw.note_id) {
            summary.skipped += 1;
        } else if let Err(e) = n.raw.clone().validate(&limits) {
            // The server would refuse it: no teacher time for it.
            summary
                .failed
                .push((n.raw.note_id.clone(), format!("invalid note: {e}")));
        } else if seen.insert(n.raw.note_id.clone()) {
            todo.push(n);
        }
    }
    if opts.limit > 0 {
        todo.truncate(opts.limit);
    }
    // Repair a torn last line before appending after it.
    if let Ok(text) = std::fs::read_to_string(&records_path) {
        if !text.is_empty() && !text.ends_with('\n') {
            let keep = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
            std::fs::write(&records_path, &text[..keep])?;
        }
    }
    let mut writer = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&records_path)
        .with_context(|| format!("opening {}", records_path.display()))?;
    let client = Arc::new(client::Client::new(opts.clone())?);
    let progress = if opts.progress {
        indicatif::ProgressBar::new(todo.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for note in todo {
        let (client, handbook, limits, sem) = (
            Arc::clone(&client),
            Arc::clone(&handbook),
            limits.clone(),
            Arc::clone(&sem),
        );
        let permit = sem.acquire_owned().await?;
        tasks.spawn(async move {
            let category = handbook.resolve(&note.raw.category);
            let r = client.extract(&note, category, &limits).await;
            drop(permit);
            (note, r)
        });
        // Write what has finished so far, so a killed run keeps it.
        while let Some(done) = tasks.try_join_next() {
            record(done?, &mut writer, &mut summary, &progress, &opts.model)?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(done?, &mut writer, &mut summary, &progress, &opts.model)?;
    }
    progress.finish_and_clear();
    let mut failures = String::new();
    for (id, reason) in &summary.failed {
        failures.push_str(&json!({"note_id": id, "error": reason}).to_string());
        failures.push('\n');
    }
    std::fs::write(out.join("failures.jsonl"), failures)?;
    Ok(summary)
}

fn record(
    (note, result): (InputNote, anyhow::Result<TeacherSteps>),
    writer: &mut std::fs::File,
    summary: &mut BuildSummary,
    progress: &indicatif::ProgressBar,
    model: &str,
) -> anyhow::Result<()> {
    progress.inc(1);
    match result {
        Ok(teacher) => {
            let rec = TeacherRecord {
                note_id: note.raw.note_id,
                category: note.raw.category,
                title: note.raw.title,
                body: note.raw.body,
                images: note.raw.image_uris,
                lang: note.lang,
                teacher,
                teacher_model: Some(model.to_string()),
            };
            let mut line = serde_json::to_string(&rec)?;
            line.push('\n');
            writer.write_all(line.as_bytes())?;
            writer.flush()?;
            summary.done += 1;
        }
        Err(e) => summary.failed.push((note.raw.note_id, format!("{e:#}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_groups_failures_by_step_and_kind() {
        let summary = BuildSummary {
            done: 2,
            skipped: 1,
            failed: vec![
                (
                    "a".into(),
                    "step 2: HTTP 500 Internal Server Error: {\"x\": 1}".into(),
                ),
                (
                    "b".into(),
                    "step 2: HTTP 500 Internal Server Error: busy".into(),
                ),
                (
                    "c".into(),
                    "step 3: no tag grounded in the candidates".into(),
                ),
            ],
        };
        assert_eq!(
            summary.to_string(),
            "2 extracted, 1 already done, 3 failed\n  2 x step 2: HTTP 500 Internal Server \
             Error\n  1 x step 3: no tag grounded in the candidates"
        );
    }
}
