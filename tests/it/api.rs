//! The API over real gRPC: tagging, feature reads in both layouts, idempotency, restart
//! durability, bad input, the bulk stream, scans, schema, reflection.

use std::collections::HashSet;

use tagllm::{grpc::pb, tagging::handbook::Handbook};
use tonic::Code;

use crate::common::{fixture_note, root, test_config, App};

fn handbook() -> Handbook {
    Handbook::load(&root().join("models/handbook.toml")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_read_reuse_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::spawn(test_config(dir.path())).await;
    let mut tags = app.tag_client().await;
    let mut feats = app.feature_client().await;
    let note = fixture_note("sneakers_2");
    let id = note.note_id.clone();

    let first = tags
        .tag_note(pb::TagNoteRequest {
            note: Some(note.clone()),
            force: false,
            include_raw_output: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.note_id, id);
    assert!(!first.reused);
    assert!(first.raw_output.starts_with('{'), "{}", first.raw_output);
    let t = first.timings.unwrap();
    assert!(t.prompt_tokens > 100 && t.generated_tokens > 0, "{t:?}");
    // Constrained decoding: every tag is of a handbook dimension (`{}`, no tag, is a valid answer).
    let hb = handbook();
    let sneakers = hb.resolve("sneakers");
    for tag in &first.tags {
        assert!(
            sneakers.has_dimension(&tag.dimension),
            "off-handbook dimension {:?}",
            tag.dimension
        );
        assert!(!tag.value.is_empty());
    }
    let f = first.features.clone().unwrap();
    assert!(f.found);
    // Every tag lands in the catch-all hashed group.
    let all = &f.groups["tags"];
    assert_eq!(all.ids.len(), first.tags.len());

    // Batch read: the note and an unknown id, in request order.
    let resp = feats
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec![id.clone(), "never-tagged".into()],
            groups: vec![],
            include_tags: true,
            layout: pb::Layout::NoteMajor as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.notes.len(), 2);
    assert_eq!(resp.notes[0].note_id, id);
    assert!(resp.notes[0].found);
    assert_eq!(resp.notes[0].groups, f.groups);
    assert_eq!(resp.notes[0].tags, first.tags);
    assert_eq!(resp.notes[1].note_id, "never-tagged");
    assert!(!resp.notes[1].found);
    assert!(resp.notes[1].groups.is_empty());

    // JAGGED agrees with NOTE_MAJOR.
    let j = feats
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec!["never-tagged".into(), id.clone()],
            groups: vec!["tags".into(), "brand".into()],
            include_tags: false,
            layout: pb::Layout::Jagged as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .jagged
        .unwrap();
    assert_eq!(j.found, vec![false, true]);
    assert_eq!(
        j.groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["tags", "brand"]
    );
    for g in &j.groups {
        let nm = &f.groups[&g.name];
        assert_eq!(g.lengths, vec![0, nm.ids.len() as i32]);
        assert_eq!(g.values, nm.ids);
        assert_eq!(g.weights, nm.weights);
    }

    // Same content again: reused, no generation.
    let second = tags
        .tag_note(pb::TagNoteRequest {
            note: Some(note.clone()),
            force: false,
            include_raw_output: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(second.reused);
    assert_eq!(second.tags, first.tags);
    assert_eq!(second.timings.unwrap().generated_tokens, 0);

    // Changed content: generated again.
    let mut edited = note.clone();
    edited
        .body
        .push_str(" Update: the sole is holding up well.");
    let third = tags
        .tag_note(pb::TagNoteRequest {
            note: Some(edited),
            force: false,
            include_raw_output: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!third.reused);
    let stored = third.features.unwrap().groups;
    app.stop().await;

    // Restart on the same data directory: what was acknowledged is served.
    let app = App::spawn(test_config(dir.path())).await;
    let mut feats = app.feature_client().await;
    let resp = feats
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec![id.clone()],
            groups: vec![],
            include_tags: false,
            layout: pb::Layout::NoteMajor as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.notes[0].found);
    assert_eq!(resp.notes[0].groups, stored);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.limits.max_ids_per_request = 100;
    let app = App::spawn(cfg).await;
    let mut tags = app.tag_client().await;
    let mut feats = app.feature_client().await;

    let mut empty_id = fixture_note("beauty_2");
    empty_id.note_id.clear();
    let mut long_body = fixture_note("beauty_2");
    long_body.body = "字".repeat(8193);
    let mut ctrl = fixture_note("beauty_2");
    ctrl.title = "a\u{7}b".into();
    let mut no_image_source = fixture_note("beauty_2");
    no_image_source.images.push(pb::Image { source: None });
    let cases: Vec<(Option<pb::Note>, &str)> = vec![
        (None, "note"),
        (Some(empty_id), "note.note_id"),
        (Some(long_body), "note.body"),
        (Some(ctrl), "note.title"),
        (Some(no_image_source), "note.images[0]"),
    ];
    for (note, field) in cases {
        let err = tags
            .tag_note(pb::TagNoteRequest {
                note,
                force: false,
                include_raw_output: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }

    let read = |ids: Vec<String>, groups: Vec<String>, layout: i32| pb::GetNoteFeaturesRequest {
        note_ids: ids,
        groups,
        include_tags: false,
        layout,
    };
    let too_many: Vec<String> = (0..101).map(|i| format!("n{i}")).collect();
    for (req, field) in [
        (read(too_many, vec![], 0), "note_ids:"),
        (
            read(vec!["ok".into(), String::new()], vec![], 0),
            "note_ids[1]",
        ),
        (read(vec!["x".repeat(200)], vec![], 0), "note_ids[0]"),
        (read(vec!["ok".into()], vec!["nope".into()], 0), "groups[0]"),
        (read(vec!["ok".into()], vec![], 7), "layout"),
    ] {
        let err = feats.get_note_features(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // Still serving, and an empty batch is an empty answer.
    let ok = feats
        .get_note_features(read(vec![], vec![], 0))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.notes.is_empty());
    app.wait_serving("tagllm.v1.TagService").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_stream_scan_schema_and_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::spawn(test_config(dir.path())).await;
    let mut tags = app.tag_client().await;
    let mut feats = app.feature_client().await;

    let mut bad = fixture_note("food_2");
    bad.note_id = String::new();
    let mut pets = fixture_note("pets_2");
    pets.images.push(pb::Image {
        source: Some(pb::image::Source::Uri(
            "https://example.invalid/cat.jpg".into(),
        )),
    });
    let reqs = vec![fixture_note("food_1"), bad, pets.clone()]
        .into_iter()
        .map(|n| pb::TagNoteRequest {
            note: Some(n),
            force: false,
            include_raw_output: false,
        })
        .collect::<Vec<_>>();
    let mut stream = tags
        .tag_notes(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        got.push(r);
    }
    assert_eq!(got.len(), 3);
    let errors: Vec<_> = got.iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].error.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
    let pets_resp = got.iter().find(|r| r.note_id == pets.note_id).unwrap();
    // Unknown category: the fallback's dimensions; the text-only model says it ignored the image.
    let hb = handbook();
    for t in &pets_resp.tags {
        assert!(hb.fallback.has_dimension(&t.dimension), "{t:?}");
    }
    assert_eq!(pets_resp.images_used, 0);
    assert!(
        pets_resp.warnings.iter().any(|w| w.contains("text-only")),
        "{:?}",
        pets_resp.warnings
    );
    assert!(
        pets_resp.warnings.iter().any(|w| w.contains("fallback")),
        "{:?}",
        pets_resp.warnings
    );

    // Scan: both tagged notes, filterable by category.
    let mut scan = feats
        .scan_note_features(pb::ScanNoteFeaturesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids = HashSet::new();
    while let Some(n) = scan.message().await.unwrap() {
        assert!(n.found);
        ids.insert(n.note_id);
    }
    assert_eq!(
        ids,
        HashSet::from(["food-001".to_string(), pets.note_id.clone()])
    );
    let mut scan = feats
        .scan_note_features(pb::ScanNoteFeaturesRequest {
            category: "food".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = scan.message().await.unwrap().unwrap();
    assert_eq!(first.note_id, "food-001");
    assert!(scan.message().await.unwrap().is_none());

    let schema = feats
        .get_feature_schema(pb::GetFeatureSchemaRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = schema.groups.iter().map(|g| g.name.as_str()).collect();
    assert!(names.contains(&"brand") && names.contains(&"tags"));
    let brand = schema.groups.iter().find(|g| g.name == "brand").unwrap();
    assert_eq!(brand.id_kind, pb::IdKind::Vocab as i32);
    assert_eq!(brand.id_space, brand.vocab_size + brand.oov_buckets);
    let v = schema.versions.unwrap();
    assert!(
        v.model.contains("SmolLM2") && !v.handbook.is_empty() && !v.schema.is_empty(),
        "{v:?}"
    );
    assert!(schema.categories.iter().any(|c| c.key == "sneakers"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let dir = tempfile::tempdir().unwrap();
    let app = App::spawn(test_config(dir.path())).await;
    let ch = app.channel().await;

    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = c1
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("no list")
    };
    let names: HashSet<_> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "tagllm.v1.TagService",
        "tagllm.v1.FeatureService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(s), "{s} missing from {names:?}");
    }

    let mut c0 = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut resp = c0
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("no list")
    };
    assert!(list
        .service
        .iter()
        .any(|s| s.name == "tagllm.v1.FeatureService"));
    app.stop().await;
}

/// Constrained decoding end to end on hostile notes (prompt injection in title or body, chat
/// control strings, requests for keys outside the handbook, an empty category): every answer is
/// one JSON object of the resolved category's dimensions, within the limits, and no tag dropped.
/// The token budget is the default's order of magnitude: the distilled student writes ~80-token
/// answers, and a budget that cuts one mid-value can leave a value with no letter or digit in it
/// (`"¥"`), which the parser drops as empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_answers_hold_on_hostile_notes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.model.max_new_tokens = 160;
    let max_chars = cfg.limits.max_tag_chars;
    let per_dim = cfg.limits.max_tags_per_dimension;
    let app = App::spawn(cfg).await;
    let mut tags = app.tag_client().await;
    let wanted = [
        "eval-002", "eval-015", "eval-019", "eval-044", "eval-051", "eval-061",
    ];
    let text = std::fs::read_to_string(root().join("tests/fixtures/eval_notes.jsonl")).unwrap();
    let notes: Vec<pb::Note> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| wanted.contains(&v["note_id"].as_str().unwrap()))
        .map(|v| pb::Note {
            note_id: v["note_id"].as_str().unwrap().into(),
            category: v["category"].as_str().unwrap().into(),
            title: v["title"].as_str().unwrap().into(),
            body: v["body"].as_str().unwrap().into(),
            images: vec![],
            updated_at_ms: 0,
        })
        .collect();
    assert_eq!(notes.len(), wanted.len());
    let reqs: Vec<_> = notes
        .iter()
        .map(|n| pb::TagNoteRequest {
            note: Some(n.clone()),
            force: false,
            include_raw_output: true,
        })
        .collect();
    let mut stream = tags
        .tag_notes(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let hb = handbook();
    let mut seen = 0;
    while let Some(r) = stream.message().await.unwrap() {
        assert!(r.error.is_none(), "{:?}", r.error);
        let note = notes.iter().find(|n| n.note_id == r.note_id).unwrap();
        let cat = hb.resolve(&note.category);
        let answer: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&r.raw_output)
                .unwrap_or_else(|e| panic!("{}: {e}: {}", r.note_id, r.raw_output));
        assert!(!answer.is_empty());
        for (k, vals) in &answer {
            assert!(
                cat.has_dimension(k),
                "{}: key {k} not in {}",
                r.note_id,
                cat.key
            );
            let vals = vals.as_array().unwrap();
            assert!(
                !vals.is_empty() && vals.len() <= per_dim,
                "{}",
                r.raw_output
            );
            for v in vals {
                assert!(
                    v.as_str().unwrap().chars().count() <= max_chars,
                    "{}",
                    r.raw_output
                );
            }
        }
        assert_eq!(
            r.dropped_tags as usize, 0,
            "{}: {}",
            r.note_id, r.raw_output
        );
        assert!(!r.tags.is_empty());
        for t in &r.tags {
            assert!(t.score > 0.0 && t.score <= 1.0, "{t:?}");
        }
        seen += 1;
    }
    assert_eq!(seen, wanted.len());
    app.stop().await;
}

/// A model that fails to load leaves tagging UNAVAILABLE (health NOT_SERVING) while feature reads
/// keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_degrades_to_feature_reads_only() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF this is not a model").unwrap();
    let mut cfg = test_config(&dir.path().join("data"));
    cfg.model.path = bad;
    let app = App::spawn_until(cfg, "tagllm.v1.FeatureService").await;
    let mut feats = app.feature_client().await;
    let r = feats
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec!["a".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.notes[0].found);
    let mut tags = app.tag_client().await;
    let mut status = tonic::Status::ok("");
    for _ in 0..100 {
        status = tags
            .tag_note(pb::TagNoteRequest {
                note: Some(fixture_note("travel_1")),
                force: false,
                include_raw_output: false,
            })
            .await
            .unwrap_err();
        if status.message().contains("loading") {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        break;
    }
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not ready"),
        "{}",
        status.message()
    );
    assert_eq!(
        app.health("tagllm.v1.TagService").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(app.health("").await, ServingStatus::NotServing as i32);
    app.stop().await;
}

/// More concurrent TagNote calls than the queue holds: the excess is refused at once with
/// RESOURCE_EXHAUSTED and a retry hint, the accepted ones complete, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.model.queue_capacity = 1;
    cfg.model.max_new_tokens = 32;
    // One sequence at a time, so the queue is what fills: with batching, the engine takes
    // waiting jobs into free slots between steps and how many are accepted depends on timing.
    cfg.model.max_batch = 1;
    let app = App::spawn(cfg).await;
    let ch = app.channel().await;
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = pb::tag_service_client::TagServiceClient::new(ch.clone());
        let mut note = fixture_note("digital_2");
        note.note_id = format!("overload-{i}");
        calls.push(tokio::spawn(async move {
            c.tag_note(pb::TagNoteRequest {
                note: Some(note),
                force: false,
                include_raw_output: false,
            })
            .await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(r) => {
                assert!(!r.into_inner().tags.is_empty());
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("queue is full"), "{}", s.message());
                // A retry hint in gRPC's own pushback header, also named in the message.
                let hint: u64 = s
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .expect("grpc-retry-pushback-ms")
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((50..=60_000).contains(&hint), "{hint}");
                assert!(
                    s.message().contains(&format!("{hint} ms")),
                    "{}",
                    s.message()
                );
                refused += 1;
            }
        }
    }
    // One runs, at most one waits: the rest are refused.
    assert!((1..=2).contains(&ok), "accepted {ok}");
    assert_eq!(ok + refused, 6);
    app.wait_serving("tagllm.v1.TagService").await;
    app.stop().await;
}
