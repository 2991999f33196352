//! Teacher data for tag distillation (TagLLM's multimodal CoT extraction): the record a teacher
//! writes for a note (its three steps), the supervised fine-tuning (SFT) examples made from it with
//! the server's own prompt, and the answer text a student is trained to produce.
//!
//! The SFT prompt is exactly what the server sends the model ([`prompt::messages`], the
//! model's chat template), and the answer is laid out exactly as the tag grammar
//! ([`crate::tagging::grammar`]) lets the model write it, so a student learns the text it will be asked to
//! produce when serving.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{
    domain::canonical::Canonical,
    domain::Limits,
    domain::{RawNote, Tag},
    model::{chat::Message, TextModel},
    tagging::handbook::{Category, Handbook},
    tagging::{
        prompt::{self, PromptStyle},
        tags,
    },
};

/// One note and what the teacher made of it. The line format of `datasets/distill/**/*.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherRecord {
    /// The note's id.
    pub note_id: String,
    /// Category as a client sends it (key, alias or unknown).
    pub category: String,
    /// Title.
    #[serde(default)]
    pub title: String,
    /// Body.
    #[serde(default)]
    pub body: String,
    /// Image URIs.
    #[serde(default)]
    pub images: Vec<String>,
    /// `zh`, `en` or `mixed`.
    #[serde(default)]
    pub lang: String,
    /// The teacher's three steps.
    pub teacher: TeacherSteps,
    /// The teacher model that wrote them, when a program did (`tagllm build-data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_model: Option<String>,
}

/// The three steps of CoT extraction.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TeacherSteps {
    /// Step 1: what the note is about.
    pub about: String,
    /// Step 2: candidate values per dimension, each with its evidence.
    #[serde(default)]
    pub candidates: BTreeMap<String, Vec<Candidate>>,
    /// Step 3: the consolidated tags per dimension.
    pub tags: BTreeMap<String, Vec<String>>,
}

/// A step-2 candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    /// The candidate tag value.
    pub value: String,
    /// The note's words (or image content) that support it.
    pub evidence: String,
}

impl TeacherRecord {
    /// The note, as a client would send it.
    pub fn raw_note(&self) -> RawNote {
        RawNote {
            note_id: self.note_id.clone(),
            category: self.category.clone(),
            title: self.title.clone(),
            body: self.body.clone(),
            image_uris: self.images.clone(),
            ..Default::default()
        }
    }
}

/// A teacher's tags as reference tags of `category`: handbook dimension order, values normalized
/// like the server's, empty ones dropped.
pub fn reference_tags(
    teacher_tags: &BTreeMap<String, Vec<String>>,
    category: &Category,
) -> Vec<Tag> {
    let mut out = Vec::new();
    for d in &category.dimensions {
        for v in teacher_tags.get(&d.key).into_iter().flatten() {
            let value = crate::domain::normalize(v);
            if !tags::is_near_empty(&value) {
                out.push(Tag {
                    dimension: d.key.clone(),
                    value,
                    score: 1.0,
                });
            }
        }
    }
    out
}

/// Reads teacher records from JSONL files, or from every `*.jsonl` under a directory (sorted by
/// path, so the order is the same on every machine).
pub fn read_records(paths: &[PathBuf]) -> anyhow::Result<Vec<TeacherRecord>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            collect_jsonl(p, &mut files)?;
        } else {
            files.push(p.clone());
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: TeacherRecord = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", f.display(), i + 1))?;
            out.push(rec);
        }
    }
    Ok(out)
}

fn collect_jsonl(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_jsonl(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

/// The answer a model writes for `tags` of `category`, in the one layout the tag grammar accepts:
/// dimensions in handbook order, `{"brand": ["Nike", "Air Jordan"], "scene": ["通勤"]}`. Values
/// are written as the teacher spelled them (not normalized); values the grammar cannot hold (a
/// quote, a backslash, a control character, edge whitespace) are left out. `None` when no value is
/// left.
pub fn answer_text(
    category: &Category,
    teacher_tags: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    let mut parts = Vec::new();
    for d in &category.dimensions {
        let values: Vec<String> = teacher_tags
            .get(&d.key)
            .into_iter()
            .flatten()
            .filter(|v| grammar_can_write(v))
            .map(|v| format!("\"{v}\""))
            .collect();
        if !values.is_empty() {
            parts.push(format!("\"{}\": [{}]", d.key, values.join(", ")));
        }
    }
    (!parts.is_empty()).then(|| format!("{{{}}}", parts.join(", ")))
}

fn grammar_can_write(v: &str) -> bool {
    !v.is_empty()
        && !v.chars().any(|c| c == '"' || c == '\\' || c.is_control())
        && !v.starts_with(char::is_whitespace)
        && !v.ends_with(char::is_whitespace)
}

/// The rationale variant's assistant text: the three steps, then the answer on its last line.
pub fn rationale_text(steps: &TeacherSteps, answer: &str) -> String {
    let candidates = serde_json::to_string(&steps.candidates).unwrap_or_default();
    format!(
        "Step 1, about: {}\nStep 2, candidates with evidence: {candidates}\nStep 3, tags:\n{answer}",
        steps.about.trim()
    )
}

/// One SFT example.
pub struct SftExample {
    /// The note's id.
    pub note_id: String,
    /// The handbook entry the note resolves to.
    pub category: String,
    /// System and user messages, exactly as the server builds them.
    pub messages: Vec<Message>,
    /// The assistant's answer.
    pub answer: String,
    /// The rationale variant's assistant text.
    pub rationale: String,
}

/// How SFT examples are made.
#[derive(Debug, Clone, Default)]
pub struct SftOptions {
    /// The prompt style (the server must use the same one with the trained adapter).
    pub style: PromptStyle,
    /// Synonyms: the teacher's values become their canonical spellings in the answers, so the
    /// student learns one spelling per thing (the feature schema's `[canonical]` files).
    pub canonical: Canonical,
}

/// Builds the SFT example of `record`; an error when the note is invalid under `limits` or its
/// tags leave nothing the grammar can write.
pub fn sft_example(
    record: &TeacherRecord,
    handbook: &Handbook,
    limits: &Limits,
    opts: &SftOptions,
) -> anyhow::Result<SftExample> {
    let note = record
        .raw_note()
        .validate(limits)
        .with_context(|| format!("note {}", record.note_id))?;
    let category = handbook.resolve(&note.category);
    // A note the teacher gave no tag is a negative example: the answer is `{}`, which the
    // grammar allows, so the student learns to leave such notes untagged.
    let tags: BTreeMap<String, Vec<String>> = record
        .teacher
        .tags
        .iter()
        .map(|(dim, values)| (dim.clone(), opts.canonical.canonicalize(dim, values)))
        .collect();
    let answer = if tags.values().all(Vec::is_empty) {
        "{}".to_string()
    } else {
        answer_text(category, &tags)
            .with_context(|| format!("note {}: no tag the grammar can write", record.note_id))?
    };
    Ok(SftExample {
        note_id: record.note_id.clone(),
        category: category.key.clone(),
        messages: prompt::messages(&note, category, limits, note.images.len(), opts.style),
        rationale: rationale_text(&record.teacher, &answer),
        answer,
    })
}

/// Token ids of one example for a given model: the prompt (chat template, assistant turn opened)
/// and the completion the loss is taken on (the answer, then the end-of-turn token).
#[derive(Debug, Serialize)]
pub struct TokenizedExample {
    /// The note's id.
    pub note_id: String,
    /// Prompt ids, exactly as the server encodes them.
    pub prompt_ids: Vec<u32>,
    /// Answer ids and the end-of-turn id.
    pub completion_ids: Vec<u32>,
}

/// Tokenizes `example` for `model`: its answer, or with `rationale` its rationale (which ends
/// with the answer) as the completion.
pub fn tokenize(
    model: &TextModel,
    example: &SftExample,
    rationale: bool,
) -> anyhow::Result<TokenizedExample> {
    let prompt_ids = model.encode_chat(&example.messages, "")?;
    let text = if rationale {
        &example.rationale
    } else {
        &example.answer
    };
    let mut completion_ids = model.encode_text(text)?;
    completion_ids.extend(model.end_of_turn());
    Ok(TokenizedExample {
        note_id: example.note_id.clone(),
        prompt_ids,
        completion_ids,
    })
}

/// Writes `messages.jsonl` (system, user, assistant answer), `messages_cot.jsonl` (the same with
/// the rationale before the answer) and, given a model, `tokens.jsonl` and `tokens_cot.jsonl`
/// (their token ids) and `sft.json` (how they were made: the prompt style, which an adapter
/// trained on them must be served with) into `out`. Returns how many examples were written and
/// the notes skipped, with why.
pub fn write_sft(
    records: &[TeacherRecord],
    handbook: &Handbook,
    limits: &Limits,
    opts: &SftOptions,
    model: Option<&TextModel>,
    out: &Path,
) -> anyhow::Result<(usize, Vec<String>)> {
    use std::io::Write;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let open = |name: &str| -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
        let p = out.join(name);
        Ok(std::io::BufWriter::new(
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
        ))
    };
    let mut plain = open("messages.jsonl")?;
    let mut cot = open("messages_cot.jsonl")?;
    let mut toks = model.map(|_| open("tokens.jsonl")).transpose()?;
    let mut toks_cot = model.map(|_| open("tokens_cot.jsonl")).transpose()?;
    let (mut written, mut skipped) = (0, Vec::new());
    for r in records {
        let ex = match sft_example(r, handbook, limits, opts) {
            Ok(ex) => ex,
            Err(e) => {
                skipped.push(format!("{e:#}"));
                continue;
            }
        };
        let chat = |assistant: &str| {
            let mut msgs: Vec<serde_json::Value> = ex
                .messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect();
            msgs.push(serde_json::json!({"role": "assistant", "content": assistant}));
            serde_json::json!({"note_id": ex.note_id, "category": ex.category, "messages": msgs})
        };
        writeln!(plain, "{}", chat(&ex.answer))?;
        writeln!(cot, "{}", chat(&ex.rationale))?;
        if let (Some(model), Some(w), Some(wc)) = (model, toks.as_mut(), toks_cot.as_mut()) {
            writeln!(
                w,
                "{}",
                serde_json::to_string(&tokenize(model, &ex, false)?)?
            )?;
            writeln!(
                wc,
                "{}",
                serde_json::to_string(&tokenize(model, &ex, true)?)?
            )?;
        }
        written += 1;
    }
    plain.flush()?;
    cot.flush()?;
    for w in toks.iter_mut().chain(toks_cot.iter_mut()) {
        w.flush()?;
    }
    if let Some(model) = model {
        let meta = serde_json::json!({
            "prompt": opts.style.as_str(),
            "canonical": opts.canonical.dimensions().count() > 0,
            "prompt_version": prompt::PROMPT_VERSION,
            "model": model.info.version,
            "examples": written,
        });
        std::fs::write(out.join("sft.json"), format!("{meta:#}\n"))
            .with_context(|| format!("writing {}", out.join("sft.json").display()))?;
    }
    Ok((written, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handbook() -> Handbook {
        Handbook::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/handbook.toml")).unwrap()
    }

    #[test]
    fn answer_follows_the_grammar_layout_and_parses_back() {
        let h = handbook();
        let cat = h.resolve("sneakers");
        let mut t = BTreeMap::new();
        t.insert("scene".to_string(), vec!["通勤".to_string()]);
        t.insert(
            "brand".to_string(),
            vec!["Nike".into(), "Air Jordan".into()],
        );
        t.insert("bogus".to_string(), vec!["x".into()]);
        t.insert("style".to_string(), vec!["say \"hi\"".into()]);
        let a = answer_text(cat, &t).unwrap();
        assert_eq!(a, r#"{"brand": ["Nike", "Air Jordan"], "scene": ["通勤"]}"#);
        let limits = Limits::default();
        let parsed = tags::parse_output(&a, cat, &limits);
        assert!(parsed.well_formed);
        let got: Vec<(String, String)> = parsed
            .tags
            .iter()
            .map(|t| (t.dimension.clone(), t.value.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("brand", "nike"),
                ("brand", "air jordan"),
                ("scene", "通勤")
            ]
            .map(|(d, v)| (d.to_string(), v.to_string()))
        );
        // The grammar accepts it: llguidance's own check is in tests/it (needs a tokenizer).
        assert!(answer_text(cat, &BTreeMap::new()).is_none());
    }
}
