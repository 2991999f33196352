//! Read replicas: a CPU-only feature reader follows a primary over gRPC and serves the same
//! features; it refuses to serve under another handbook or schema.

use std::time::Duration;

use crate::common::{fixture_note, root, Proc};
use tagllm::grpc::pb;
use tonic_health::pb::health_check_response::ServingStatus;

async fn tag(p: &Proc, name: &str) -> String {
    let note = fixture_note(name);
    let id = note.note_id.clone();
    p.client()
        .tag_client()
        .await
        .tag_note(pb::TagNoteRequest {
            note: Some(note),
            ..Default::default()
        })
        .await
        .unwrap();
    id
}

async fn read(p: &Proc, ids: &[String]) -> Vec<pb::NoteFeatures> {
    p.client()
        .feature_client()
        .await
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: ids.to_vec(),
            include_tags: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_the_primary_and_serves_identical_features() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Proc::spawn(&dir.path().join("primary"), &[], "").await;
    let mut ids = vec![
        tag(&primary, "sneakers_2").await,
        tag(&primary, "digital_1").await,
    ];

    let upstream = format!("http://{}", primary.addr);
    let env = [
        ("TAGLLM__REPLICA__UPSTREAM", upstream.as_str()),
        ("TAGLLM__REPLICA__POLL_SECS", "1"),
        // A replica loads no model: a path that does not exist is fine.
        ("TAGLLM__MODEL__PATH", "/nonexistent.gguf"),
    ];
    let replica_dir = dir.path().join("replica");
    let replica = Proc::spawn(&replica_dir, &env, "tagllm.v1.FeatureService").await;
    assert_eq!(read(&replica, &ids).await, read(&primary, &ids).await);

    // Reads only: TagService is not served, and reflection does not list it.
    let err = replica
        .client()
        .tag_client()
        .await
        .tag_note(pb::TagNoteRequest {
            note: Some(fixture_note("food_2")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let schema = |p: &Proc| {
        let app = p.client();
        async move {
            app.feature_client()
                .await
                .get_feature_schema(pb::GetFeatureSchemaRequest {})
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(schema(&replica).await, schema(&primary).await);

    // A note tagged later arrives within a few polls.
    ids.push(tag(&primary, "food_2").await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = read(&replica, &ids).await;
        if got.iter().all(|n| n.found) {
            assert_eq!(got, read(&primary, &ids).await);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica never caught up: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The whole store scans the same on both.
    let scan = |p: &Proc| {
        let app = p.client();
        async move { app.scan_all().await }
    };
    assert_eq!(scan(&replica).await.len(), 3);
    assert_eq!(scan(&replica).await, scan(&primary).await);

    // A replica restarted on its data dir serves what it had at once, then follows on.
    assert!(replica.terminate().success());
    let replica = Proc::spawn(&replica_dir, &env, "tagllm.v1.FeatureService").await;
    assert_eq!(read(&replica, &ids).await, read(&primary, &ids).await);

    // Under another handbook version the replica would serve other ids: it refuses.
    let handbook = std::fs::read_to_string(root().join("models/handbook.toml")).unwrap();
    let other = dir.path().join("handbook.toml");
    std::fs::write(
        &other,
        handbook.replacen("version = \"", "version = \"other-", 1),
    )
    .unwrap();
    let other_s = other.to_str().unwrap();
    let mut env2 = env.to_vec();
    env2.push(("TAGLLM__HANDBOOK", other_s));
    let stale = Proc::start(&dir.path().join("stale"), &env2);
    // Give it several polls' worth of time, then check it never became SERVING.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        stale.client().health("tagllm.v1.FeatureService").await,
        ServingStatus::NotServing as i32
    );
    let m = stale.scrape().await;
    assert!(m.contains("tagllm_replica_poll_errors_total"), "{m}");
}
