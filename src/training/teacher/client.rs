//! The teacher's HTTP client: one chat completion with retries, the `response_format` ladder,
//! and the three steps of one note.

use std::{
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use anyhow::Context;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    prompts::{
        first_object, object_at, parse_candidates, parse_tags, step1_prompt, step2_prompt,
        step3_prompt, system_prompt,
    },
    schema::{self, AnswerSchema, ResponseFormat},
    InputNote, TeacherOptions,
};
use crate::{domain::Limits, tagging::handbook::Category, training::distill::TeacherSteps};

/// One answer of the teacher.
struct Answer {
    content: String,
    /// `finish_reason` was `length`: the answer stopped at the token limit.
    cut: bool,
}

/// Why a request got no answer.
enum CallError {
    /// HTTP 400 or 422, or an error that names `response_format`: the server refused the
    /// request as written (for a schema it does not take, the next weaker format may pass).
    Refused(anyhow::Error),
    /// Anything else, after the retries.
    Failed(anyhow::Error),
}

/// A teacher endpoint, shared by the notes in flight.
pub(super) struct Client {
    http: reqwest::Client,
    opts: TeacherOptions,
    /// The strongest [`ResponseFormat`] (its index) the server has not refused yet; only ever
    /// weakens, so one refusal costs one extra request per run, not one per note.
    format: AtomicU8,
}

impl Client {
    pub(super) fn new(opts: TeacherOptions) -> anyhow::Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(opts.timeout)
                .build()
                .context("building the HTTP client")?,
            format: AtomicU8::new(opts.response_format as u8),
            opts,
        })
    }

    /// One chat completion, retried with exponential backoff on transient failures.
    async fn post(&self, body: &Value) -> Result<Answer, CallError> {
        let url = format!("{}/chat/completions", self.opts.url.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            let mut req = self.http.post(&url).json(body);
            if let Some(k) = &self.opts.api_key {
                req = req.bearer_auth(k);
            }
            let (retryable, err, retry_after) = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let v: Value = match resp.json().await {
                        Ok(v) => v,
                        Err(e) => {
                            return Err(CallError::Failed(
                                anyhow::Error::new(e).context("teacher answer is not JSON"),
                            ))
                        }
                    };
                    let choice = &v["choices"][0];
                    return match choice["message"]["content"].as_str() {
                        Some(content) => Ok(Answer {
                            content: content.to_string(),
                            cut: choice["finish_reason"] == "length",
                        }),
                        None => Err(CallError::Failed(anyhow::anyhow!(
                            "teacher answer has no choices[0].message.content"
                        ))),
                    };
                }
                Ok(resp) => {
                    let status = resp.status();
                    let after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    let err = anyhow::anyhow!(
                        "HTTP {status}: {}",
                        text.chars().take(200).collect::<String>()
                    );
                    // llama-cpp-python answers a request it cannot validate (a response format
                    // it does not know) with HTTP 500 and a message naming the field.
                    if matches!(status.as_u16(), 400 | 422) || text.contains("response_format") {
                        return Err(CallError::Refused(err));
                    }
                    let retryable =
                        matches!(status.as_u16(), 408 | 429) || status.is_server_error();
                    (retryable, err, after)
                }
                Err(e) => (
                    e.is_timeout() || e.is_connect() || e.is_request(),
                    anyhow::anyhow!("request failed: {e}"),
                    None,
                ),
            };
            if !retryable || attempt >= self.opts.retries {
                return Err(CallError::Failed(err));
            }
            let backoff =
                Duration::from_millis(500u64 << attempt.min(6)).min(Duration::from_secs(30));
            tokio::time::sleep(retry_after.unwrap_or(backoff).min(Duration::from_secs(60))).await;
            attempt += 1;
        }
    }

    /// One chat completion whose answer should follow `schema` (or free text without one).
    /// A refused `response_format` is asked again with the next weaker one; when that passes,
    /// the weaker one is used from then on (logged once), and when none passes, the first
    /// refusal is the error (a 400 about something else weakens nothing).
    async fn chat(
        &self,
        messages: &[Value],
        max_tokens: u32,
        schema: Option<&AnswerSchema>,
    ) -> anyhow::Result<Answer> {
        let body = |format: Option<Value>| {
            let mut body = json!({
                "model": self.opts.model,
                "messages": messages,
                "temperature": 0.0,
                "max_tokens": max_tokens,
            });
            if let Some(f) = format {
                body["response_format"] = f;
            }
            body
        };
        let Some(schema) = schema else {
            return self.post(&body(None)).await.map_err(CallError::into_inner);
        };
        let first = ResponseFormat::from_index(self.format.load(Ordering::Relaxed));
        let mut format = first;
        let mut refusal = None;
        loop {
            match self.post(&body(format.request_field(schema))).await {
                Ok(answer) => {
                    tracing::debug!(format = format.name(), cut = answer.cut, answer = %answer.content, "teacher answer");
                    if format != first {
                        let was = self.format.fetch_max(format as u8, Ordering::Relaxed);
                        if was < format as u8 {
                            tracing::warn!(
                                refused = ResponseFormat::from_index(was).name(),
                                using = format.name(),
                                reason = %refusal.map(|e| format!("{e:#}")).unwrap_or_default(),
                                "the teacher refused the answer's response_format; asking with a weaker one from now on"
                            );
                        }
                    }
                    return Ok(answer);
                }
                Err(CallError::Refused(e)) => {
                    let e = refusal.take().unwrap_or(e);
                    match format.weaker() {
                        Some(w) => {
                            refusal = Some(e);
                            format = w;
                        }
                        None => return Err(e),
                    }
                }
                Err(CallError::Failed(e)) => return Err(e),
            }
        }
    }

    /// The three steps for one note.
    pub(super) async fn extract(
        &self,
        note: &InputNote,
        category: &Category,
        limits: &Limits,
    ) -> anyhow::Result<TeacherSteps> {
        let text = step1_prompt(&note.raw, note.raw.image_uris.len());
        let first = if note.raw.image_uris.is_empty() {
            json!(text)
        } else {
            // Images first, as data URLs, then the text.
            let mut parts = Vec::new();
            for uri in &note.raw.image_uris {
                parts.push(json!({"type": "image_url", "image_url": {"url": data_url(uri)?}}));
            }
            parts.push(json!({"type": "text", "text": text}));
            Value::Array(parts)
        };
        let mut messages = vec![
            json!({"role": "system", "content": system_prompt(category)}),
            json!({"role": "user", "content": first}),
        ];
        let [m1, m2, m3] = self.opts.max_tokens;
        let about = self.chat(&messages, m1, None).await.context("step 1")?;
        messages.push(json!({"role": "assistant", "content": about.content}));

        messages.push(json!({"role": "user", "content": step2_prompt(category, limits)}));
        let step2 = schema::candidates(category, limits);
        let raw2 = self
            .chat(&messages, m2, Some(&step2))
            .await
            .context("step 2")?;
        let candidates = parse_candidates(category, object(&raw2, "step 2", m2)?);
        let step3 = schema::tags(category, limits, &candidates).with_context(|| {
            if candidates.is_empty() {
                "step 2: no candidate of a handbook dimension"
            } else {
                "step 2: no candidate can be a tag (too long, or unwritable)"
            }
        })?;
        messages.push(json!({"role": "assistant", "content": raw2.content}));

        messages.push(json!({"role": "user", "content": step3_prompt(limits)}));
        let raw3 = self
            .chat(&messages, m3, Some(&step3))
            .await
            .context("step 3")?;
        let tags = parse_tags(category, limits, &candidates, object(&raw3, "step 3", m3)?);
        anyhow::ensure!(
            !tags.is_empty(),
            "step 3: no tag grounded in the candidates"
        );
        Ok(TeacherSteps {
            about: about.content.trim().to_string(),
            candidates,
            tags,
        })
    }
}

impl CallError {
    fn into_inner(self) -> anyhow::Error {
        match self {
            CallError::Refused(e) | CallError::Failed(e) => e,
        }
    }
}

/// The JSON object of a step's answer, or why there is none. A cut answer counts only if its
/// first object closed: an object found further in would be a piece of the cut one.
fn object(
    answer: &Answer,
    step: &str,
    max_tokens: u32,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let text = &answer.content;
    let found = if answer.cut {
        text.find('{').and_then(|i| object_at(&text[i..]))
    } else {
        first_object(text)
    };
    found.with_context(|| {
        if answer.cut {
            format!("{step}: answer cut at its token limit ({max_tokens}) before its JSON closed")
        } else {
            format!("{step}: answer is not a JSON object")
        }
    })
}

/// An image of the note as a data URL (local paths and `file://` URIs only: a teacher is asked
/// about what is on this machine).
fn data_url(uri: &str) -> anyhow::Result<String> {
    let path = uri.strip_prefix("file://").unwrap_or(uri);
    anyhow::ensure!(
        !path.contains("://"),
        "image {uri}: only local paths and file:// URIs can be sent to a teacher"
    );
    let bytes = std::fs::read(path).with_context(|| format!("image {uri}"))?;
    let mime = match image::guess_format(&bytes).with_context(|| format!("image {uri}"))? {
        image::ImageFormat::Png => "image/png",
        image::ImageFormat::Jpeg => "image/jpeg",
        image::ImageFormat::WebP => "image/webp",
        image::ImageFormat::Gif => "image/gif",
        other => anyhow::bail!("image {uri}: {other:?} is not sent to teachers"),
    };
    Ok(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}
