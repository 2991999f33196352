//! What operators and client code see: the Prometheus endpoint of a real server process, the
//! README's grpcurl examples run by the real grpcurl, and the Python client's own test suite.

use std::collections::BTreeSet;

use crate::common::{fixture_note, root, test_venv, Proc};
use tagllm::grpc::pb;

/// The value of the sample whose name and labels start with `series` (labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{', ',']))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_rpcs_engine_cache_and_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[], "").await;
    let app = p.client();
    let mut tags = app.tag_client().await;
    let mut feats = app.feature_client().await;

    let note = fixture_note("sneakers_1");
    let id = note.note_id.clone();
    tags.tag_note(pb::TagNoteRequest {
        note: Some(note.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    // The same content again: reused, no generation.
    let r = tags
        .tag_note(pb::TagNoteRequest {
            note: Some(note),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.reused);
    for _ in 0..3 {
        feats
            .get_note_features(pb::GetNoteFeaturesRequest {
                note_ids: vec![id.clone(), "never-tagged".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let bad = feats
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let m = p.scrape().await;
    let get =
        r#"tagllm_grpc_requests_total{service="tagllm.v1.FeatureService",method="GetNoteFeatures""#;
    assert_eq!(
        sample(&m, &format!(r#"{get},code="OK"}}"#)),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, &format!(r#"{get},code="InvalidArgument"}}"#)),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"tagllm_grpc_requests_total{service="tagllm.v1.TagService",method="TagNote",code="OK"}"#
        ),
        Some(2.0)
    );
    // Latency histograms per RPC and status, with buckets.
    assert_eq!(
        sample(
            &m,
            r#"tagllm_grpc_request_duration_seconds_count{service="tagllm.v1.FeatureService",method="GetNoteFeatures",code="OK"}"#
        ),
        Some(3.0)
    );
    assert!(m.contains(r#"tagllm_grpc_request_duration_seconds_bucket{service="tagllm.v1.TagService",method="TagNote",code="OK",le="+Inf"} 2"#), "{m}");
    assert_eq!(
        sample(&m, r#"tagllm_notes_tagged_total{result="generated"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"tagllm_notes_tagged_total{result="reused"}"#),
        Some(1.0)
    );
    // The warm-up is not a job; the one generation is.
    assert_eq!(
        sample(&m, r#"tagllm_engine_jobs_total{outcome="ok"}"#),
        Some(1.0)
    );
    // Tokens: the prompt is hundreds of tokens (the handbook guidance alone), generation is
    // bounded by max_new_tokens.
    let prompt = sample(&m, "tagllm_prompt_tokens_total").unwrap();
    let generated = sample(&m, "tagllm_generated_tokens_total").unwrap();
    assert!(prompt > 100.0, "{prompt}");
    assert!((1.0..=48.0).contains(&generated), "{generated}");
    assert_eq!(
        sample(&m, "tagllm_decode_tokens_per_second_count"),
        Some(1.0)
    );
    assert!(sample(&m, "tagllm_decode_tokens_per_second_sum").unwrap() > 0.0);
    // One sample per decode step (the default model is batched), each of one sequence here.
    let steps = sample(&m, "tagllm_engine_batch_size_count").unwrap();
    assert!(steps >= 1.0, "{steps}");
    assert_eq!(sample(&m, "tagllm_engine_batch_size_sum"), Some(steps));
    assert_eq!(sample(&m, "tagllm_engine_queue_depth"), Some(0.0));
    assert_eq!(sample(&m, "tagllm_engine_queue_capacity"), Some(64.0));
    assert_eq!(sample(&m, "tagllm_model_ready"), Some(1.0));
    // Cache: the reused TagNote and three reads of the tagged note hit; the never-tagged id
    // misses each time.
    let hits = sample(&m, r#"tagllm_cache_lookups_total{result="hit"}"#).unwrap();
    let misses = sample(&m, r#"tagllm_cache_lookups_total{result="miss"}"#).unwrap();
    assert_eq!(hits, 4.0, "{m}");
    assert!(misses >= 3.0, "{misses}");
    // Store: one durable put, reads for the misses.
    assert_eq!(
        sample(&m, r#"tagllm_store_operation_seconds_count{op="put"}"#),
        Some(1.0)
    );
    assert!(sample(&m, r#"tagllm_store_operation_seconds_count{op="get_many"}"#).unwrap() >= 3.0);
    assert!(m.contains(r#"tagllm_build_info{version=""#));

    // A clean SIGTERM exit.
    let status = p.terminate();
    assert!(status.success(), "{status}");
}

/// The shell block under `### grpcurl` in the README, split into its examples (blank-line
/// separated).
fn readme_grpcurl_examples() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("### grpcurl")
        .expect("README has a grpcurl section");
    let block = &readme[start..];
    let open = block.find("```sh\n").unwrap() + "```sh\n".len();
    let close = open + block[open..].find("```").unwrap();
    block[open..close]
        .split("\n\n")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_grpcurl_examples_run_against_the_server() {
    let venv = test_venv();
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[], "").await;
    let examples = readme_grpcurl_examples();
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut called = BTreeSet::new();
    let mut outputs = Vec::new();
    for ex in &examples {
        let script = ex.replace("127.0.0.1:50051", &p.addr.to_string());
        let out = tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("PATH", &path)
            .current_dir(root())
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "README example failed:\n{ex}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
        for word in script.split_whitespace() {
            let w = word.trim_matches(|c| c == '\'' || c == '"' || c == '\\');
            if w.starts_with("tagllm.v1.") || w.starts_with("grpc.health.v1.") {
                if let Some((svc, method)) = w.split_once('/') {
                    called.insert(format!("{svc}/{method}"));
                }
            }
        }
        outputs.push((ex.clone(), stdout));
    }
    // Every RPC has a JSON example, and reflection's list and describe work (v1alpha: grpcurl
    // 1.8.6 knows nothing newer).
    for rpc in [
        "tagllm.v1.TagService/TagNote",
        "tagllm.v1.TagService/TagNotes",
        "tagllm.v1.FeatureService/GetNoteFeatures",
        "tagllm.v1.FeatureService/ScanNoteFeatures",
        "tagllm.v1.FeatureService/GetFeatureSchema",
        "grpc.health.v1.Health/Check",
    ] {
        assert!(
            called.contains(rpc),
            "no README example calls {rpc}: {called:?}"
        );
    }
    let find = |needle: &str| {
        outputs
            .iter()
            .find(|(ex, _)| ex.contains(needle))
            .unwrap_or_else(|| panic!("no README example with {needle:?}"))
            .1
            .clone()
    };
    let list = find(" list");
    for svc in [
        "tagllm.v1.TagService",
        "tagllm.v1.FeatureService",
        "grpc.health.v1.Health",
    ] {
        assert!(list.contains(svc), "{list}");
    }
    let describe = find(" describe ");
    assert!(describe.contains("rpc GetNoteFeatures"), "{describe}");
    assert!(find("Health/Check").contains("SERVING"));
    // The image example sends inline base64 bytes; the text-only model says it did not use them.
    let image = find("\"data\"");
    let v: serde_json::Value = serde_json::from_str(&image).unwrap();
    assert!(v["tags"].is_array(), "{image}");
    assert!(
        v["warnings"].to_string().contains("image"),
        "the text-only model should say the image was not used: {image}"
    );
    // The bulk example has one bad note: an error entry, not a broken stream.
    let bulk = find("TagNotes");
    assert!(bulk.contains("\"error\""), "{bulk}");
    assert!(
        bulk.contains("INVALID_ARGUMENT") || bulk.contains("\"code\": 3"),
        "{bulk}"
    );
    // Reads see what the examples tagged, in both layouts.
    let reads: Vec<&(String, String)> = outputs
        .iter()
        .filter(|(ex, _)| ex.contains("GetNoteFeatures"))
        .collect();
    assert!(
        reads.iter().any(|(_, o)| o.contains("\"found\": true")),
        "{reads:?}"
    );
    assert!(
        reads.iter().any(|(_, o)| o.contains("\"jagged\"")),
        "{reads:?}"
    );
    assert!(find("GetFeatureSchema").contains("\"idSpace\""));
    assert!(find("ScanNoteFeatures").contains("\"noteId\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_suite_passes_against_the_server() {
    let venv = test_venv();
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[], "").await;
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ])
        .env("TAGLLM_ADDR", p.addr.to_string())
        .current_dir(root())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pytest failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("passed"), "{stdout}");
}

/// A fixture note as one JSONL line in `tagllm backfill`'s input format.
fn jsonl_line(name: &str) -> String {
    let n = fixture_note(name);
    serde_json::json!({
        "note_id": n.note_id, "category": n.category, "title": n.title, "body": n.body,
        "author": "extra fields are ignored"
    })
    .to_string()
}

fn backfill(args: &[&str]) -> (i32, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    crate::common::backfill(&args, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resumes_retries_overload_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    // A one-slot queue under a 4-wide stream: notes get RESOURCE_EXHAUSTED and must be retried.
    // One sequence at a time, so the queue is what fills: with batching the engine moves queued
    // notes into free batch slots between steps, and whether any is refused depends on timing.
    let p = Proc::spawn(
        &dir.path().join("data"),
        &[
            ("TAGLLM__MODEL__QUEUE_CAPACITY", "1"),
            ("TAGLLM__MODEL__MAX_BATCH", "1"),
            ("TAGLLM__SERVER__STREAM_CONCURRENCY", "4"),
        ],
        "",
    )
    .await;
    let input = dir.path().join("notes.jsonl");
    let lines = [
        jsonl_line("sneakers_1"),
        "{not json".to_string(),
        jsonl_line("beauty_1"),
        String::new(),
        r#"{"note_id": "", "category": "food", "body": "no id"}"#.to_string(),
        jsonl_line("food_1"),
        jsonl_line("travel_1"),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let input_s = input.to_str().unwrap();
    let addr = p.addr.to_string();

    // A canary run of one note: the bad JSON line is reported, the rest left for later.
    let (code, out) = backfill(&[input_s, "--addr", &addr, "--limit", "1", "--window", "8"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("6 notes: 1 tagged, 0 reused, 0 skipped (done before), 1 failed, 4 unsent"),
        "{out}"
    );
    assert!(out.contains("failed InvalidJson: 1"), "{out}");
    let state = std::fs::read_to_string(dir.path().join("notes.jsonl.done")).unwrap();
    assert_eq!(state.lines().count(), 1, "{state}");

    // The rest: three valid notes arrive at once at an engine that runs one and queues one, so
    // at least one is refused with RESOURCE_EXHAUSTED; it is retried, not failed.
    let (code, out) = backfill(&[input_s, "--addr", &addr, "--window", "8"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("6 notes: 3 tagged, 0 reused, 1 skipped (done before), 2 failed, 0 unsent"),
        "{out}"
    );
    let retries: usize = out
        .split_once(" overload retries")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(retries >= 1, "{out}");
    assert!(out.contains("failed InvalidArgument: 1"), "{out}");
    let failed = std::fs::read_to_string(dir.path().join("notes.jsonl.failed")).unwrap();
    let failed: Vec<serde_json::Value> = failed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0]["line"], 2);
    assert_eq!(failed[1]["line"], 5);
    assert!(failed[1]["message"].as_str().unwrap().contains("note_id"));

    // Everything acknowledged is served.
    let ids: Vec<String> = ["sneakers_1", "beauty_1", "food_1", "travel_1"]
        .iter()
        .map(|n| fixture_note(n).note_id)
        .collect();
    let got = p
        .client()
        .feature_client()
        .await
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.notes.iter().all(|n| n.found), "{got:?}");

    // --restart sends every note again: the server answers from the store.
    let (code, out) = backfill(&[input_s, "--addr", &addr, "--restart"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("6 notes: 0 tagged, 4 reused, 0 skipped (done before), 2 failed"),
        "{out}"
    );
    // A server that is not there: a clear error and exit 2.
    let (code, out) = backfill(&[input_s, "--addr", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("connecting to 127.0.0.1:1"), "{out}");
}
