//! Tag distillation: `tagllm build-data` end to end against a real OpenAI-compatible server
//! (llama-cpp-python's, installed by `scripts/test-deps.sh`, serving the default GGUF as a stand-in
//! teacher), including a resumed run and an unreachable teacher; and the committed teacher
//! dataset checked against what the server reads and what the grammar lets a model write.
//!
//! What a 135M model writes as a teacher differs between CPUs (llama.cpp sums in another order
//! with and without AVX-512), so the real-server test asserts what holds for any answer: the
//! counts, the resume, the records' checks, and that llama-cpp-python honoured the answer schema
//! (no answer that is not JSON). The protocol on answers known to parse is `teacher.rs`'s.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tagllm::{
    domain::Limits,
    model::Requantize,
    model::TextModel,
    tagging::grammar::tag_grammar,
    tagging::handbook::Handbook,
    tagging::tags::parse_output,
    training::distill::{read_records, reference_tags, sft_example, SftOptions, TeacherRecord},
};

use crate::common::{
    build_data, counts, free_port, lines, model_path, output_text, root, test_venv,
};

/// llama-cpp-python's OpenAI-compatible server on a free port, killed on drop.
struct Teacher {
    child: Child,
    url: String,
}

impl Teacher {
    fn start() -> Teacher {
        let port = free_port();
        let child = Command::new(test_venv().join("bin/python"))
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(model_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // One thread: the other tests keep both cores busy, and llama.cpp's threads wait for
            // each other at every op when they do not get a core each.
            .args(["--n_ctx", "4096", "--n_threads", "1", "--verbose", "false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting llama_cpp.server (scripts/test-deps.sh installs it)");
        let t = Teacher {
            child,
            url: format!("http://127.0.0.1:{port}/v1"),
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ =
                    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") {
                    return t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "llama_cpp.server did not come up"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Teacher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NOTES: &str = r#"{"note_id": "bd-1", "category": "sneakers", "title": "Samba OG review", "body": "I bought the adidas Samba OG in white for $100. It runs long, so size down half a size. Great with straight jeans.", "lang": "en"}
{"note_id": "bd-2", "category": "food", "title": "Best ramen in Tokyo", "body": "Ichiran in Shibuya: rich tonkotsu broth, thin noodles, about 1,000 yen. Go at night to skip the line.", "lang": "en"}
{"note_id": "bd-3", "category": "美妆", "title": "兰蔻小黑瓶用了一个月", "body": "油皮夏天用也不闷，早晚各一泵，肤色亮了一点。专柜价1080元。", "lang": "zh"}
"#;

#[test]
fn build_data_against_a_local_openai_server_resumes() {
    let teacher = Teacher::start();
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.jsonl");
    std::fs::write(&notes, NOTES).unwrap();
    let out = dir.path().join("out");
    let notes_s = notes.to_str().unwrap();
    let common = [
        "--notes",
        notes_s,
        "--teacher-url",
        &teacher.url,
        "--teacher-model",
        "smollm2",
        "--concurrency",
        "2",
        "--max-tokens",
        "96,320,160",
    ];

    // A first run stopped after two notes (--limit stands in for a killed run).
    let (code1, text1) = build_data(&[&common[..], &["--limit", "2"]].concat(), &out);
    let (done1, skipped1, failed1) = counts(&text1);
    assert_eq!((done1 + failed1, skipped1), (2, 0), "{text1}");
    assert_eq!(code1, if failed1 > 0 { 1 } else { 0 }, "{text1}");

    // llama-cpp-python refuses OpenAI's json_schema (HTTP 500) and takes its own spelling: the first
    // run weakens the format once, with a warning.
    assert_eq!(
        text1
            .matches("asking with a weaker one from now on")
            .count(),
        1,
        "{text1}"
    );

    // The resumed run asks only for what is not in records.jsonl yet.
    let (code2, text2) = build_data(&common, &out);
    let (done2, skipped2, failed2) = counts(&text2);
    assert_eq!(skipped2, done1, "{text2}");
    assert_eq!(done2 + failed2, 3 - done1, "{text2}");
    assert_eq!(code2, if failed2 > 0 { 1 } else { 0 }, "{text2}");

    let records = read_records(&[out.join("records.jsonl")]).unwrap();
    let ids: HashSet<&str> = records.iter().map(|r| r.note_id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "a note was extracted twice");
    assert_eq!(records.len(), done1 + done2);
    let handbook = Handbook::load(&root().join("models/handbook.toml")).unwrap();
    for r in &records {
        assert_eq!(r.teacher_model.as_deref(), Some("smollm2"));
        let category = handbook.resolve(&r.category);
        assert!(!r.teacher.about.is_empty());
        for (dim, values) in &r.teacher.tags {
            assert!(category.has_dimension(dim), "{dim} in {}", r.note_id);
            assert!(!values.is_empty() && values.len() <= 3);
            let grounded: HashSet<String> = r.teacher.candidates[dim]
                .iter()
                .map(|c| tagllm::domain::normalize(&c.value))
                .collect();
            for v in values {
                assert!(
                    grounded.contains(&tagllm::domain::normalize(v)),
                    "{v} is ungrounded"
                );
            }
        }
    }
    // Whatever this CPU's llama.cpp made the model write, an answer under the schema is JSON: a
    // note fails only for an answer cut at its token limit, or one with nothing to keep.
    let failures = lines(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), failed2);
    assert!(!format!("{text1}{text2}").contains("not a JSON object"));
    for f in &failures {
        let reason = f["error"].as_str().unwrap();
        assert!(
            reason.contains("answer cut at its token limit")
                || reason.contains("no candidate")
                || reason.contains("no tag grounded"),
            "{reason}\n{text1}\n{text2}"
        );
    }
    // Every record is an SFT example in both forms, and tokenized for the default model.
    let plain = lines(&out.join("messages.jsonl"));
    let cot = lines(&out.join("messages_cot.jsonl"));
    let toks = lines(&out.join("tokens.jsonl"));
    assert_eq!(
        (plain.len(), cot.len(), toks.len()),
        (records.len(), records.len(), records.len())
    );
    for (p, t) in plain.iter().zip(&toks) {
        let msgs = p["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[2]["role"], "assistant");
        assert!(msgs[2]["content"].as_str().unwrap().starts_with('{'));
        let completion = t["completion_ids"].as_array().unwrap();
        assert_eq!(
            completion.last().unwrap(),
            2,
            "completion ends with <|im_end|>"
        );
    }
    drop(teacher);
}

#[test]
fn build_data_reports_an_unreachable_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.jsonl");
    std::fs::write(&notes, NOTES).unwrap();
    let out = dir.path().join("out");
    let url = format!("http://127.0.0.1:{}/v1", free_port());
    let (code, text) = build_data(
        &[
            "--notes",
            notes.to_str().unwrap(),
            "--teacher-url",
            &url,
            "--retries",
            "1",
        ],
        &out,
    );
    assert_eq!(code, 1, "{text}");
    assert_eq!(counts(&text), (0, 0, 3), "{text}");
    let failures = lines(&out.join("failures.jsonl"));
    assert_eq!(failures.len(), 3);
    assert!(failures[0]["error"]
        .as_str()
        .unwrap()
        .contains("request failed"));
    assert!(read_records(&[out.join("records.jsonl")])
        .unwrap()
        .is_empty());
}

/// Every note of the committed teacher dataset is valid under the default limits, and its
/// answer, in the layout the SFT examples teach, is accepted by the category's grammar (so a
/// constrained student can write it) and parses back to exactly the teacher's tags.
#[test]
fn teacher_dataset_is_what_the_server_reads_and_the_grammar_allows() {
    let records: Vec<TeacherRecord> = read_records(&[root().join("datasets/distill")]).unwrap();
    assert!(records.len() >= 500, "{} records", records.len());
    let handbook = Handbook::load(&root().join("models/handbook.toml")).unwrap();
    let limits = Limits::default();
    let mut model = TextModel::load(&model_path(), Requantize::Q8_0).unwrap();
    let mut grammars: std::collections::HashMap<String, Arc<str>> = Default::default();
    let mut langs = std::collections::BTreeMap::new();
    // As written, and in the canonical spellings of the shipped synonym files (what build-data
    // writes): both are answers the grammar allows and that parse back to the expected tags.
    let canonical = tagllm::features::Schema::load(&root().join("models/features.toml"))
        .unwrap()
        .canonical;
    let as_written = SftOptions::default();
    let canonical_opts = SftOptions {
        canonical: canonical.clone(),
        ..SftOptions::default()
    };
    let mut empty = 0;
    for r in &records {
        *langs.entry(r.lang.clone()).or_insert(0) += 1;
        let category = handbook.resolve(&r.category);
        let reference = reference_tags(&r.teacher.tags, category);
        empty += reference.is_empty() as usize;
        for (opts, want) in [
            (&as_written, reference.clone()),
            (&canonical_opts, canonical.tags(&reference)),
        ] {
            let ex = sft_example(r, &handbook, &limits, opts).unwrap();
            let parsed = parse_output(&ex.answer, category, &limits);
            assert!(parsed.well_formed, "{}", r.note_id);
            assert_eq!(
                parsed.dropped.total(),
                0,
                "{}: {:?}",
                r.note_id,
                parsed.dropped
            );
            assert_eq!(parsed.tags, want, "{}", r.note_id);
            let grammar: Arc<str> = grammars
                .entry(category.key.clone())
                .or_insert_with(|| tag_grammar(category, &limits).into())
                .clone();
            let ids = model.encode_text(&ex.answer).unwrap();
            let (c, _) = model.constrainer().start(&grammar).unwrap();
            assert!(
                c.accepts(&ids),
                "{}: grammar refuses {}",
                r.note_id,
                ex.answer
            );
        }
    }
    // Notes with nothing to tag teach the answer `{}`.
    assert!(empty >= 50, "{empty} notes without tags");
    // Chinese and English notes both, as the issue asks.
    assert!(langs.get("zh").copied().unwrap_or(0) >= 150, "{langs:?}");
    assert!(langs.get("en").copied().unwrap_or(0) >= 150, "{langs:?}");
}

/// The recipe end to end, on the CPU: `tagllm distill` writes the SFT files and runs
/// scripts/distill.py for a few steps (in target/distill-venv, made by `scripts/test-deps.sh`);
/// the adapter it saves, in PEFT's format, merges at load and changes the model's logits.
#[test]
fn distill_trains_an_adapter_the_server_merges() {
    let python = std::env::var_os("TAGLLM_DISTILL_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target/distill-venv"))
        .join("bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/test-deps.sh",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let o = Command::new(env!("CARGO_BIN_EXE_tagllm"))
        .current_dir(root())
        .args([
            "distill",
            "--from-records",
            "datasets/distill/train/watches.jsonl",
            "--prompt",
            "compact",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--python")
        .arg(&python)
        .args(["--", "--limit", "4", "--max-steps", "3", "--batch", "2"])
        .args(["--lr", "0.01", "--device", "cpu", "--no-check-logits"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(training["summary"]["steps"], 3, "{training}");
    assert_eq!(training["summary"]["examples"], 4);
    let losses: Vec<f64> = training["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.len() == 3 && losses.iter().all(|l| l.is_finite() && *l > 0.0));
    let (toks, cot) = (
        lines(&out.join("sft/train/tokens.jsonl")),
        lines(&out.join("sft/train/tokens_cot.jsonl")),
    );
    assert_eq!((toks.len(), cot.len()), (44, 44));
    for (t, c) in toks.iter().zip(&cot) {
        // The rationale variant: the same prompt, the three steps before the same answer.
        assert_eq!(t["prompt_ids"], c["prompt_ids"]);
        let (tc, cc) = (
            t["completion_ids"].as_array().unwrap(),
            c["completion_ids"].as_array().unwrap(),
        );
        assert!(cc.len() > tc.len() && cc.ends_with(tc), "{}", t["note_id"]);
    }
    // The adapter says which prompt it was trained on, and `auto` serves it with that prompt.
    let sft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sft/train/sft.json")).unwrap())
            .unwrap();
    assert_eq!(
        (&sft["prompt"], &sft["examples"]),
        (&"compact".into(), &44.into())
    );
    let model_cfg = tagllm::config::ModelConfig {
        adapter: out.display().to_string(),
        ..Default::default()
    };
    assert_eq!(
        model_cfg.prompt_style(),
        Ok(tagllm::tagging::prompt::PromptStyle::Compact)
    );

    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/llamacpp_logits.json")).unwrap(),
    )
    .unwrap();
    let prompt: Vec<u32> = fx["cases"][0]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut base = TextModel::load(&model_path(), Requantize::Q8_0).unwrap();
    let opts = tagllm::model::LoadOptions {
        adapter: Some(out.clone()),
        ..tagllm::model::LoadOptions::cpu(Requantize::Q8_0)
    };
    let mut student = TextModel::load_with(&model_path(), &opts).unwrap();
    let (a, b) = (
        base.forward(&prompt, 0).unwrap(),
        student.forward(&prompt, 0).unwrap(),
    );
    let moved = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "the trained adapter changed nothing ({moved})"
    );
}
