//! Auth and transport: bearer tokens on every RPC but health; TLS and mutual TLS with
//! certificates made for the test.

use std::{path::Path, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tagllm::grpc::pb;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code, Request,
};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::common::{test_config, App};

const TOKEN: &str = "test-token-0123456789abcdef";

fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
        );
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_every_rpc_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        format!("{TOKEN}\nnext-token-0123456789abcdef\n"),
    )
    .unwrap();
    let mut cfg = test_config(&dir.path().join("data"));
    cfg.auth.token_file = Some(token_file);
    // Health needs no token, so the harness can wait for it as usual.
    let app = App::spawn_until(cfg, "tagllm.v1.FeatureService").await;
    let mut feats = app.feature_client().await;
    let read = || pb::GetNoteFeaturesRequest {
        note_ids: vec!["n1".into()],
        ..Default::default()
    };

    let err = feats
        .get_note_features(with_token(read(), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization"), "{}", err.message());
    let err = feats
        .get_note_features(with_token(read(), Some("test-token-0123456789abcdeX")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains(TOKEN));
    // Either token of a rotation is accepted.
    for t in [TOKEN, "next-token-0123456789abcdef"] {
        let ok = feats
            .get_note_features(with_token(read(), Some(t)))
            .await
            .unwrap()
            .into_inner();
        assert!(!ok.notes[0].found);
    }
    // Tagging and the schema are guarded too; health is not.
    let err = app
        .tag_client()
        .await
        .tag_note(with_token(pb::TagNoteRequest::default(), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = feats
        .get_feature_schema(with_token(pb::GetFeatureSchemaRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut health = HealthClient::new(app.channel().await);
    health
        .check(HealthCheckRequest {
            service: "tagllm.v1.FeatureService".into(),
        })
        .await
        .unwrap();
    app.stop().await;
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tagllm test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("ranker");
    Pki {
        ca: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

async fn tls_channel(app: &App, pki: &Pki, client_identity: bool) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if client_identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn read_over(ch: Channel) -> Result<(), tonic::Status> {
    pb::feature_service_client::FeatureServiceClient::new(ch)
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec!["n1".into()],
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&dir.path().join("data"));
    cfg.tls.cert_file = Some(write(dir.path(), "server.pem", &pki.server_cert));
    cfg.tls.key_file = Some(write(dir.path(), "server.key", &pki.server_key));
    let app = App::start(cfg.clone()).await;
    // The harness's plaintext client cannot talk to it; a TLS client trusting the CA can.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ch = loop {
        if let Ok(ch) = tls_channel(&app, &pki, false).await {
            break ch;
        }
        assert!(tokio::time::Instant::now() < deadline, "no TLS connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    read_over(ch).await.unwrap();
    let plain = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(read_over(ch).await.is_err(), "plaintext call to a TLS port");
    }
    // tagllm's own clients over TLS: backfill tags a note, a replica follows it.
    let ca_path = write(dir.path(), "ca.pem", &pki.ca);
    let upstream = format!("https://localhost:{}", app.addr.port());
    let n = crate::common::fixture_note("digital_2");
    let input = write(
        dir.path(),
        "notes.jsonl",
        &serde_json::json!({"note_id": n.note_id, "category": n.category, "title": n.title, "body": n.body}).to_string(),
    );
    let (code, text) = crate::common::backfill(
        &[
            "--addr".as_ref(),
            upstream.as_ref(),
            "--ca-file".as_ref(),
            ca_path.as_os_str(),
            input.as_os_str(),
        ],
        None,
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 tagged"), "{text}");
    let mut rcfg = test_config(&dir.path().join("replica"));
    rcfg.replica.upstream = upstream.clone();
    rcfg.replica.poll_secs = 1;
    rcfg.replica.tls.ca_file = Some(ca_path.clone());
    let replica = App::spawn_until(rcfg, "tagllm.v1.FeatureService").await;
    let got = replica
        .feature_client()
        .await
        .get_note_features(pb::GetNoteFeaturesRequest {
            note_ids: vec![n.note_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.notes[0].found);
    replica.stop().await;
    app.stop().await;

    // Mutual TLS: a client without a certificate from the CA is refused in the handshake.
    cfg.tls.client_ca_file = Some(ca_path.clone());
    let app = App::start(cfg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ch = loop {
        if let Ok(ch) = tls_channel(&app, &pki, true).await {
            break ch;
        }
        assert!(tokio::time::Instant::now() < deadline, "no mTLS connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    read_over(ch).await.unwrap();
    match tls_channel(&app, &pki, false).await {
        Err(_) => {}
        Ok(ch) => assert!(
            read_over(ch).await.is_err(),
            "mTLS let a client without a certificate in"
        ),
    }
    // A replica with a client certificate follows a server that requires one.
    let mut rcfg = test_config(&dir.path().join("replica-mtls"));
    rcfg.replica.upstream = format!("https://localhost:{}", app.addr.port());
    rcfg.replica.poll_secs = 1;
    rcfg.replica.tls.ca_file = Some(ca_path);
    rcfg.replica.tls.cert_file = Some(write(dir.path(), "client.pem", &pki.client_cert));
    rcfg.replica.tls.key_file = Some(write(dir.path(), "client.key", &pki.client_key));
    let replica = App::spawn_until(rcfg, "tagllm.v1.FeatureService").await;
    replica.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_and_replicas_send_the_token() {
    use crate::common::{fixture_note, Proc};
    let dir = tempfile::tempdir().unwrap();
    let env = [("TAGLLM_AUTH_TOKEN", TOKEN)];
    let primary = Proc::spawn(&dir.path().join("primary"), &env, "").await;
    let n = fixture_note("pets_2");
    let line = serde_json::json!({"note_id": n.note_id, "category": n.category, "title": n.title, "body": n.body});
    let input = dir.path().join("notes.jsonl");
    std::fs::write(&input, line.to_string()).unwrap();
    let addr = primary.addr.to_string();
    let run = |token: Option<&str>| {
        crate::common::backfill(
            &["--addr".as_ref(), addr.as_ref(), input.as_os_str()],
            token,
        )
    };
    let (code, out) = run(None);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("Unauthenticated") || out.contains("authorization"),
        "{out}"
    );
    let (code, out) = run(Some(TOKEN));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 tagged"), "{out}");

    // A replica with the token follows the guarded primary and guards its own reads.
    let upstream = format!("http://{}", primary.addr);
    let replica = Proc::spawn(
        &dir.path().join("replica"),
        &[
            ("TAGLLM_AUTH_TOKEN", TOKEN),
            ("TAGLLM__REPLICA__UPSTREAM", upstream.as_str()),
            ("TAGLLM__REPLICA__POLL_SECS", "1"),
        ],
        "tagllm.v1.FeatureService",
    )
    .await;
    let mut c = replica.client().feature_client().await;
    let req = || pb::GetNoteFeaturesRequest {
        note_ids: vec![n.note_id.clone()],
        ..Default::default()
    };
    assert_eq!(
        c.get_note_features(with_token(req(), None))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let got = c
        .get_note_features(with_token(req(), Some(TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert!(got.notes[0].found);
}
