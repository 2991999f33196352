//! The tagging use case: resolve the handbook entry, build the prompt, run the engine, parse and
//! normalize the tags; and, for the service, idempotency and the durable write.

use std::{collections::HashMap, sync::Arc, time::Instant};

use tokio::sync::oneshot;

use crate::{
    domain::error::{Error, Result},
    domain::{now_ms, ImageRef, Limits, Note, Versions},
    model::{
        engine::{EngineHandle, Job, SubmitError},
        ModelError,
    },
    store::{CachedNote, NoteCache, StoredNote},
    tagging::{
        grammar,
        handbook::Handbook,
        prompt::{self, PromptStyle},
        tags::{apply_scores, parse_output, Parsed},
    },
};

/// Where the time of one tagging went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Waiting for the engine.
    pub queue_ms: f64,
    /// Prompt processing.
    pub prefill_ms: f64,
    /// Token generation.
    pub decode_ms: f64,
    /// End to end, store included.
    pub total_ms: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
    /// Prompt tokens reused from the prefix cache.
    pub cached_prompt_tokens: u32,
    /// Grammar compile time (0 when cached or unconstrained).
    pub grammar_compile_ms: f64,
    /// Mean time to compute a token mask (µs; 0 unconstrained).
    pub mask_us: f64,
}

/// One fresh tagging run (no store involved).
#[derive(Debug, Clone)]
pub struct TagRun {
    /// Parsed tags and drop counts.
    pub parsed: Parsed,
    /// The model's raw output (the assistant prefix included).
    pub raw_output: String,
    /// Handbook entry used.
    pub handbook_category: String,
    /// Versions that produced it.
    pub versions: Versions,
    /// Timings.
    pub timings: Timings,
    /// Images the model read.
    pub images_used: u32,
    /// Non-fatal remarks.
    pub warnings: Vec<String>,
}

/// The result of TagNote.
#[derive(Debug, Clone)]
pub struct TagOutcome {
    /// The stored note with features.
    pub entry: Arc<CachedNote>,
    /// Whether a stored result was returned without generation.
    pub reused: bool,
    /// Timings (zeros but `total_ms` when reused).
    pub timings: Timings,
    /// Images the model read.
    pub images_used: u32,
    /// Non-fatal remarks.
    pub warnings: Vec<String>,
}

/// How tags are decoded.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decoding {
    /// Greedy under the category's grammar (handbook keys only, bounded counts and lengths) with
    /// no repeated values: every answer parses.
    Constrained,
    /// Greedy, free; the lenient parser keeps what it can. For comparison and debugging.
    Unconstrained,
}

impl Decoding {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decoding::Constrained => "constrained",
            Decoding::Unconstrained => "unconstrained",
        }
    }
}

/// Tags notes with the engine, guided by the handbook.
#[derive(Clone)]
pub struct Tagger {
    handbook: Arc<Handbook>,
    engine: EngineHandle,
    limits: Limits,
    max_new_tokens: usize,
    decoding: Decoding,
    prompt: PromptStyle,
    /// Category key -> its answer grammar (built once; the engine compiles and caches it).
    grammars: Arc<HashMap<String, Arc<str>>>,
}

fn submit_error(e: SubmitError) -> Error {
    match e {
        SubmitError::QueueFull { retry_after_ms, .. } => Error::Overloaded {
            message: format!("{e}; retry after about {retry_after_ms} ms (grpc-retry-pushback-ms)"),
            retry_after_ms,
        },
        SubmitError::NotReady(_) => Error::Unavailable(e.to_string()),
    }
}

impl Tagger {
    /// A tagger over a running engine.
    pub fn new(
        handbook: Arc<Handbook>,
        engine: EngineHandle,
        limits: Limits,
        decoding: Decoding,
        max_new_tokens: usize,
    ) -> Tagger {
        let grammars = std::iter::once(&handbook.fallback)
            .chain(&handbook.categories)
            .map(|c| (c.key.clone(), Arc::from(grammar::tag_grammar(c, &limits))))
            .collect();
        Tagger {
            handbook,
            engine,
            limits,
            max_new_tokens,
            decoding,
            prompt: PromptStyle::Full,
            grammars: Arc::new(grammars),
        }
    }

    /// The same tagger with prompts of `style` (full by default).
    pub fn with_prompt(mut self, style: PromptStyle) -> Tagger {
        self.prompt = style;
        self
    }

    /// The handbook.
    pub fn handbook(&self) -> &Arc<Handbook> {
        &self.handbook
    }

    /// The engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Versions results are produced with now (fails while the model loads).
    pub fn versions(&self) -> Result<Versions> {
        let info = self.engine.info().map_err(submit_error)?;
        Ok(self.versions_for(&info))
    }

    fn versions_for(&self, info: &crate::model::ModelInfo) -> Versions {
        Versions {
            // Everything that shapes the answer: weights, prompt, decoding and the tag limits.
            model: format!(
                "{}/{}/{}/t{}x{}c{}n{}",
                info.version,
                self.prompt.version(),
                self.decoding.as_str(),
                self.limits.max_tags_per_dimension,
                self.limits.max_tags_per_note,
                self.limits.max_tag_chars,
                self.max_new_tokens,
            ),
            handbook: self.handbook.version.clone(),
        }
    }

    /// Generates and parses tags for `note`.
    pub async fn run(&self, note: &Note) -> Result<TagRun> {
        let info = self.engine.info().map_err(submit_error)?;
        let versions = self.versions_for(&info);
        let category = self.handbook.resolve(&note.category);
        let mut warnings = Vec::new();
        if !note.images.is_empty() && !info.multimodal {
            warnings.push(format!(
                "model {} is text-only: {} image(s) not used",
                info.name,
                note.images.len()
            ));
        }
        let images = match &info.image_processor {
            Some(proc) => {
                let uris = note
                    .images
                    .iter()
                    .filter(|i| matches!(i, ImageRef::Uri(_)))
                    .count();
                if uris > 0 {
                    warnings.push(format!(
                        "{uris} image URI(s) not used: the server does not fetch URIs; send the bytes"
                    ));
                }
                crate::tagging::images::preprocess_note(note, proc.clone(), &self.limits).await?
            }
            None => Vec::new(),
        };
        let images_used = images.len() as u32;
        if self.handbook.lookup(&note.category).is_none() {
            warnings.push(format!(
                "category {:?} is not in handbook {}: used the fallback entry {:?}",
                note.category, self.handbook.version, category.key
            ));
        }
        let (prefix, grammar) = match self.decoding {
            Decoding::Constrained => (String::new(), self.grammars.get(&category.key).cloned()),
            Decoding::Unconstrained => (prompt::assistant_prefix(category), None),
        };
        let (tx, rx) = oneshot::channel();
        self.engine
            .try_submit(Job {
                messages: prompt::messages(note, category, &self.limits, images.len(), self.prompt),
                images,
                max_new_tokens: self.max_new_tokens,
                assistant_prefix: prefix.clone(),
                grammar,
                enqueued: Instant::now(),
                reply: tx,
            })
            .map_err(submit_error)?;
        let out = rx
            .await
            .map_err(|_| Error::Unavailable("the engine stopped".into()))?
            .map_err(|e| match e {
                // Notes are cut to fit; only the guidance itself can be too long: a config problem.
                ModelError::PromptTooLong { tokens, limit } => Error::internal(format!(
                    "the handbook guidance alone is {tokens} tokens, over the {limit} the model context leaves; raise model.context_tokens"
                )),
                ModelError::Cancelled => Error::Cancelled,
                other => Error::internal(other),
            })?;
        if out.truncated {
            warnings.push(format!(
                "the note was cut to fit the model context ({} tokens with the guidance)",
                out.generation.prompt_tokens
            ));
        }
        let raw_output = format!("{prefix}{}", out.generation.text);
        let mut parsed = parse_output(&raw_output, category, &self.limits);
        apply_scores(&mut parsed.tags, &out.generation.values);
        let g = &out.generation;
        Ok(TagRun {
            parsed,
            raw_output,
            handbook_category: category.key.clone(),
            versions,
            timings: Timings {
                queue_ms: out.queue.as_secs_f64() * 1e3,
                prefill_ms: g.prefill_ms,
                decode_ms: g.decode_ms,
                total_ms: 0.0,
                prompt_tokens: g.prompt_tokens as u32,
                generated_tokens: g.generated_tokens as u32,
                cached_prompt_tokens: g.cached_prompt_tokens as u32,
                grammar_compile_ms: g.grammar_compile_ms,
                mask_us: g.mask_us,
            },
            images_used,
            warnings,
        })
    }

    /// TagNote: returns the stored result when content and versions are unchanged (unless
    /// `force`), else generates, stores durably, and returns the new result.
    pub async fn tag(&self, note: Note, force: bool, notes: &Arc<NoteCache>) -> Result<TagOutcome> {
        let t0 = Instant::now();
        let versions = self.versions()?;
        let hash = note.content_hash();
        if !force {
            let id = note.id.as_str().to_string();
            let cache = notes.clone();
            let existing = tokio::task::spawn_blocking(move || cache.get_many(&[id.as_str()]))
                .await
                .map_err(Error::internal)?
                .map_err(Error::internal)?
                .pop()
                .flatten();
            if let Some(e) = existing {
                if e.record.content_hash == hash && e.record.versions == versions {
                    metrics::counter!("tagllm_notes_tagged_total", "result" => "reused")
                        .increment(1);
                    return Ok(TagOutcome {
                        entry: e,
                        reused: true,
                        timings: Timings {
                            total_ms: t0.elapsed().as_secs_f64() * 1e3,
                            ..Default::default()
                        },
                        images_used: 0,
                        warnings: Vec::new(),
                    });
                }
            }
        }
        let run = self.run(&note).await?;
        let record = StoredNote {
            note_id: note.id.as_str().to_string(),
            category: note.category.clone(),
            handbook_category: run.handbook_category,
            content_hash: hash,
            versions: run.versions,
            tags: run.parsed.tags,
            tagged_at_ms: now_ms(),
            raw_output: run.raw_output,
            dropped_tags: run.parsed.dropped.total(),
            prompt_tokens: run.timings.prompt_tokens,
            generated_tokens: run.timings.generated_tokens,
        };
        let cache = notes.clone();
        // The write is durable before this returns, and it completes even if the caller leaves.
        let entry = tokio::task::spawn_blocking(move || cache.put(record))
            .await
            .map_err(Error::internal)?
            .map_err(Error::internal)?;
        metrics::counter!("tagllm_notes_tagged_total", "result" => "generated").increment(1);
        metrics::counter!("tagllm_tags_dropped_total")
            .increment(u64::from(entry.record.dropped_tags));
        let mut timings = run.timings;
        timings.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(TagOutcome {
            entry,
            reused: false,
            timings,
            images_used: run.images_used,
            warnings: run.warnings,
        })
    }
}
