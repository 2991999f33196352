//! `tagllm build-data`'s protocol on answers known to parse, whichever CPU runs the tests: a
//! recorded teacher, a real OpenAI-compatible HTTP server on 127.0.0.1:0 that answers each step
//! with the committed teacher dataset's own annotation of the note (the teacher's words, not a
//! model's), and that fails, garbles, cuts or refuses chosen requests on cue. Resuming, counting,
//! failure records, retries, the response-format ladder and the SFT export are checked on it;
//! `training::distill::build_data_against_a_local_openai_server_resumes` keeps the protocol honest against
//! llama.cpp's real server.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::post, Router};
use serde_json::{json, Value};
use tagllm::{
    domain::Limits,
    tagging::handbook::Handbook,
    training::distill::{read_records, sft_example, SftOptions, TeacherRecord},
};

use crate::common::{build_data, counts, lines, root};

/// What the recorded teacher does with one request of a note's step, instead of answering.
#[derive(Debug, Clone)]
enum Cue {
    /// Answer with this HTTP status (and `Retry-After: 0` for 429).
    Status(u16),
    /// Answer this text instead of the annotation.
    Say(&'static str),
    /// Answer the first half of the annotation, with `finish_reason: "length"`.
    Cut,
}

/// One request the teacher saw.
#[derive(Debug, Clone)]
struct Seen {
    note_id: String,
    step: usize,
    response_format: Option<Value>,
    status: u16,
}

#[derive(Default)]
struct Script {
    /// Annotations by note title.
    by_title: HashMap<String, TeacherRecord>,
    /// Cues by (note id, step), used up in order.
    cues: HashMap<(String, usize), VecDeque<Cue>>,
    /// `response_format.type`s refused as llama-cpp-python 0.3.16's server refuses
    /// `json_schema`: HTTP 500 and a validation error naming the field.
    refuse: HashSet<&'static str>,
    seen: Vec<Seen>,
}

/// The recorded teacher, served on its own runtime thread until dropped.
struct Recorded {
    url: String,
    script: Arc<Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorded {
    fn start(records: &[TeacherRecord], refuse: &[&'static str]) -> Recorded {
        let script = Arc::new(Mutex::new(Script {
            by_title: records
                .iter()
                .map(|r| (r.title.trim().to_string(), r.clone()))
                .collect(),
            refuse: refuse.iter().copied().collect(),
            ..Default::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .with_state(Arc::clone(&script));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Recorded {
            url,
            script,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn cue(&self, note_id: &str, step: usize, cues: &[Cue]) {
        let mut s = self.script.lock().unwrap();
        s.cues
            .entry((note_id.to_string(), step))
            .or_default()
            .extend(cues.iter().cloned());
    }

    /// The requests seen so far (and forgets them).
    fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.script.lock().unwrap().seen)
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

async fn answer(State(script): State<Arc<Mutex<Script>>>, body: String) -> impl IntoResponse {
    let req: Value = serde_json::from_str(&body).unwrap();
    let messages = req["messages"].as_array().unwrap();
    let step = messages.iter().filter(|m| m["role"] == "user").count();
    let first = match &messages[1]["content"] {
        Value::String(s) => s.clone(),
        parts => parts
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect(),
    };
    let title = first
        .lines()
        .find_map(|l| l.strip_prefix("Title: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let format = req.get("response_format").cloned();
    let mut s = script.lock().unwrap();
    let record = s.by_title[&title].clone();
    let note_id = record.note_id.clone();
    let cue = s
        .cues
        .get_mut(&(note_id.clone(), step))
        .and_then(|q| q.pop_front());
    let refused = format
        .as_ref()
        .and_then(|f| f["type"].as_str())
        .is_some_and(|t| s.refuse.contains(t));
    let status = match (&cue, refused) {
        (Some(Cue::Status(code)), _) => *code,
        (_, true) => 500,
        _ => 200,
    };
    s.seen.push(Seen {
        note_id,
        step,
        response_format: format.clone(),
        status,
    });
    drop(s);
    if status != 200 {
        let message = if refused && cue.is_none() {
            "1 validation error: ('body', 'response_format', 'type'): Input should be 'text' or \
             'json_object'"
                .to_string()
        } else {
            format!("cue {status}")
        };
        let headers = [("retry-after", "0")];
        let body = json!({"error": {"message": message}}).to_string();
        return (StatusCode::from_u16(status).unwrap(), headers, body).into_response();
    }
    let teacher = &record.teacher;
    let annotation = match step {
        1 => teacher.about.clone(),
        2 => {
            // In the schema's key order when there is one, as a constrained teacher writes.
            let mut keys: Vec<&String> = teacher.candidates.keys().collect();
            if let Some(props) =
                schema_of(format.as_ref()).and_then(|s| s["properties"].as_object())
            {
                let at = |k: &str| props.keys().position(|p| p == k);
                keys.sort_by_key(|k| at(k));
            }
            let obj: serde_json::Map<String, Value> = keys
                .into_iter()
                .map(|k| (k.clone(), json!(teacher.candidates[k])))
                .collect();
            Value::Object(obj).to_string()
        }
        _ => json!(teacher.tags).to_string(),
    };
    let (content, finish) = match cue {
        Some(Cue::Say(text)) => (text.to_string(), "stop"),
        Some(Cue::Cut) => {
            let half: String = annotation
                .chars()
                .take(annotation.chars().count() / 2)
                .collect();
            (half, "length")
        }
        _ => (annotation, "stop"),
    };
    let reply = json!({
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content}}],
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        reply.to_string(),
    )
        .into_response()
}

/// The JSON schema a request's `response_format` carries, in either spelling.
fn schema_of(format: Option<&Value>) -> Option<&Value> {
    let f = format?;
    f.get("schema")
        .or_else(|| f.get("json_schema").and_then(|j| j.get("schema")))
}

/// `n` committed training records of `file`, as a notes file for build-data.
fn notes(file: &str, n: usize, dir: &Path) -> (Vec<TeacherRecord>, std::path::PathBuf) {
    let records: Vec<TeacherRecord> =
        read_records(&[root().join("datasets/distill/train").join(file)]).unwrap();
    let records: Vec<TeacherRecord> = records
        .into_iter()
        .filter(|r| r.images.is_empty())
        .take(n)
        .collect();
    assert_eq!(records.len(), n);
    let mut text = String::new();
    for r in &records {
        let note = json!({"note_id": r.note_id, "category": r.category, "title": r.title,
                          "body": r.body, "lang": r.lang});
        text.push_str(&note.to_string());
        text.push('\n');
    }
    let path = dir.join("notes.jsonl");
    std::fs::write(&path, text).unwrap();
    (records, path)
}

fn reason(failures: &[Value], id: &str) -> String {
    failures
        .iter()
        .find(|f| f["note_id"] == id)
        .unwrap_or_else(|| panic!("{id} is not in {failures:?}"))["error"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Retries, failures, a stopped run, a torn last line, and the resumed run that finishes, all on
/// answers whose outcome is known; the records and the SFT export are the committed annotations.
#[test]
fn recorded_teacher_resumes_retries_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let (records, notes) = notes("sneakers.jsonl", 5, dir.path());
    let id = |i: usize| records[i].note_id.as_str();
    let teacher = Recorded::start(&records, &[]);
    teacher.cue(id(0), 1, &[Cue::Status(500)]);
    teacher.cue(id(0), 2, &[Cue::Status(429)]);
    teacher.cue(
        id(1),
        2,
        &[Cue::Say("Here are the candidates: brand is Nike.")],
    );
    teacher.cue(id(2), 3, &[Cue::Cut]);
    let out = dir.path().join("out");
    let common = [
        "--notes",
        notes.to_str().unwrap(),
        "--teacher-url",
        &teacher.url,
        "--teacher-model",
        "recorded",
        "--concurrency",
        "1",
        "--retries",
        "2",
        "--max-tokens",
        "96,320,160",
    ];

    // A first run stopped after three notes: one retried into a record, two failures.
    let (code, text) = build_data(&[&common[..], &["--limit", "3"]].concat(), &out);
    assert_eq!((code, counts(&text)), (1, (1, 0, 2)), "{text}");
    let failures = lines(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), 2);
    assert_eq!(
        reason(&failures, id(1)),
        "step 2: answer is not a JSON object"
    );
    assert_eq!(
        reason(&failures, id(2)),
        "step 3: answer cut at its token limit (160) before its JSON closed"
    );
    assert!(
        text.contains("1 x step 2: answer is not a JSON object"),
        "{text}"
    );
    let seen = teacher.take_seen();
    let statuses = |i: usize, step: usize| -> Vec<u16> {
        seen.iter()
            .filter(|s| s.note_id == id(i) && s.step == step)
            .map(|s| s.status)
            .collect()
    };
    assert_eq!(statuses(0, 1), [500, 200], "a 5xx is retried");
    assert_eq!(statuses(0, 2), [429, 200], "a 429 is retried");
    assert_eq!(
        statuses(1, 3),
        [] as [u16; 0],
        "no step 3 after a failed step 2"
    );
    assert!(seen.iter().all(|s| s.note_id != id(3)), "--limit 3");

    // Every step-2 request asks for the category's dimensions, every step-3 request for the
    // note's candidates only, as OpenAI-style structured outputs.
    let handbook = Handbook::load(&root().join("models/handbook.toml")).unwrap();
    let category = handbook.resolve("sneakers");
    let mut dims: Vec<&str> = category.dimensions.iter().map(|d| d.key.as_str()).collect();
    dims.sort_unstable();
    for s in seen.iter().filter(|s| s.step > 1) {
        let f = s
            .response_format
            .as_ref()
            .expect("steps 2 and 3 send a format");
        assert_eq!(f["type"], "json_schema");
        let schema = &f["json_schema"]["schema"];
        let r = records.iter().find(|r| r.note_id == s.note_id).unwrap();
        if s.step == 2 {
            let mut keys: Vec<&str> = schema["properties"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            assert_eq!(keys, dims);
        } else {
            for (dim, tags) in &r.teacher.tags {
                let allowed = &schema["properties"][dim]["items"]["enum"];
                for t in tags {
                    assert!(allowed.as_array().unwrap().contains(&json!(t)), "{t}");
                }
            }
        }
    }
    assert!(seen
        .iter()
        .filter(|s| s.step == 1)
        .all(|s| s.response_format.is_none()));

    // A run killed mid-write leaves a torn last line; the resumed run repairs it and asks for
    // the rest only (the cues are used up, so every note now passes).
    let records_path = out.join("records.jsonl");
    let mut torn = std::fs::read(&records_path).unwrap();
    torn.extend_from_slice(br#"{"note_id": "torn", "categ"#);
    std::fs::write(&records_path, torn).unwrap();
    let (code, text) = build_data(&common, &out);
    assert_eq!((code, counts(&text)), (0, (4, 1, 0)), "{text}");
    assert!(teacher.take_seen().iter().all(|s| s.note_id != id(0)));
    assert!(lines(&out.join("failures.jsonl")).is_empty());

    // The records are the annotations, once each, in any order.
    let written = read_records(&[records_path]).unwrap();
    assert_eq!(written.len(), 5);
    let limits = Limits::default();
    // build-data writes the answers in the shipped schema's canonical spellings.
    let sft = SftOptions {
        canonical: tagllm::features::Schema::load(&root().join("models/features.toml"))
            .unwrap()
            .canonical,
        ..SftOptions::default()
    };
    let plain = lines(&out.join("messages.jsonl"));
    let cot = lines(&out.join("messages_cot.jsonl"));
    let toks = lines(&out.join("tokens.jsonl"));
    assert_eq!((plain.len(), cot.len(), toks.len()), (5, 5, 5));
    for (i, w) in written.iter().enumerate() {
        let r = records.iter().find(|r| r.note_id == w.note_id).unwrap();
        assert_eq!(w.teacher_model.as_deref(), Some("recorded"));
        assert_eq!(w.teacher.about, r.teacher.about);
        assert_eq!(w.teacher.tags, r.teacher.tags, "{}", r.note_id);
        let cands = |x: &TeacherRecord| json!(x.teacher.candidates);
        assert_eq!(cands(w), cands(r), "{}", r.note_id);
        // The SFT answer is the one the committed record teaches.
        let ex = sft_example(r, &handbook, &limits, &sft).unwrap();
        let msgs = plain[i]["messages"].as_array().unwrap();
        assert_eq!(msgs[2]["content"], json!(ex.answer), "{}", r.note_id);
        let completion = toks[i]["completion_ids"].as_array().unwrap();
        assert_eq!(
            completion.last().unwrap(),
            2,
            "completion ends with <|im_end|>"
        );
    }
}

/// A server that refuses `json_schema` (as llama-cpp-python's does) is asked again with
/// llama-cpp-python's spelling, once: later requests start there. A request refused in every
/// spelling (a 400 about something else) fails its note and weakens nothing.
#[test]
fn a_refused_schema_is_asked_again_in_a_weaker_format_once() {
    let dir = tempfile::tempdir().unwrap();
    let (records, notes) = notes("watches.jsonl", 3, dir.path());
    let teacher = Recorded::start(&records, &["json_schema"]);
    let bad = records[1].note_id.as_str();
    teacher.cue(
        bad,
        2,
        &[Cue::Status(400), Cue::Status(400), Cue::Status(400)],
    );
    let out = dir.path().join("out");
    let args = [
        "--notes",
        notes.to_str().unwrap(),
        "--teacher-url",
        &teacher.url,
        "--concurrency",
        "1",
    ];
    let (code, text) = build_data(&args, &out);
    assert_eq!((code, counts(&text)), (1, (2, 0, 1)), "{text}");
    assert_eq!(
        text.matches("asking with a weaker one from now on").count(),
        1,
        "{text}"
    );
    let failures = lines(&out.join("failures.jsonl"));
    assert!(
        reason(&failures, bad).starts_with("step 2: HTTP 400 Bad Request"),
        "{failures:?}"
    );
    let kinds: Vec<(String, usize, Option<String>, u16)> = teacher
        .take_seen()
        .into_iter()
        .filter(|s| s.step > 1)
        .map(|s| {
            let kind = s.response_format.map(|f| {
                let t = f["type"].as_str().unwrap().to_string();
                if f.get("schema").is_some() {
                    t + "+schema"
                } else {
                    t
                }
            });
            (s.note_id, s.step, kind, s.status)
        })
        .collect();
    let k = |i: usize, step: usize, kind: Option<&str>, status: u16| {
        (
            records[i].note_id.clone(),
            step,
            kind.map(String::from),
            status,
        )
    };
    assert_eq!(
        kinds,
        [
            k(0, 2, Some("json_schema"), 500),
            k(0, 2, Some("json_object+schema"), 200),
            k(0, 3, Some("json_object+schema"), 200),
            k(1, 2, Some("json_object+schema"), 400),
            k(1, 2, Some("json_object"), 400),
            k(1, 2, None, 400),
            k(2, 2, Some("json_object+schema"), 200),
            k(2, 3, Some("json_object+schema"), 200),
        ]
    );

    // Asked for plain JSON mode, the teacher gets no schema at all.
    let (code, text) = build_data(
        &[&args[..], &["--response-format", "json_object"]].concat(),
        &dir.path().join("plain"),
    );
    assert_eq!((code, counts(&text)), (0, (3, 0, 0)), "{text}");
    assert!(teacher
        .take_seen()
        .iter()
        .filter(|s| s.step > 1)
        .all(|s| s.response_format == Some(json!({"type": "json_object"}))));
}
