//! Builds and runs the app: loads and cross-checks handbook and schema, opens the store, starts the
//! engine, serves both services with health (NOT_SERVING until the model is warm) and reflection
//! (v1 and v1alpha), explicit message limits, and graceful shutdown with a grace period.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::{
    client::replica::{Follower, ReplicaState},
    config::{Config, LogFormat},
    features::Schema,
    grpc::{pb, FeatureApi, TagApi, FEATURE_SERVICE, TAG_SERVICE},
    model::engine::{EngineConfig, EngineHandle, EngineState},
    store::{NoteCache, RedbStore},
    tagging::handbook::Handbook,
    tagging::tagger::Tagger,
};

/// Installs the global `tracing` subscriber (text or JSON); `RUST_LOG` overrides the filter.
pub fn init_logging(cfg: &crate::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Loads the handbook and schema and checks that every dimension the schema names exists in the
/// handbook. Errors name the file and the place.
pub fn load_guidance(cfg: &Config) -> anyhow::Result<(Arc<Handbook>, Arc<Schema>)> {
    let handbook = Handbook::load(&cfg.handbook)?;
    let schema = Schema::load(&cfg.schema)?;
    for (i, g) in schema.groups.iter().enumerate() {
        for d in &g.dimensions {
            let known = std::iter::once(&handbook.fallback)
                .chain(&handbook.categories)
                .any(|c| c.has_dimension(d));
            if !known {
                anyhow::bail!(
                    "schema {}: group[{i}] {:?}: dimension {d:?} is in no category of handbook {}",
                    cfg.schema.display(),
                    g.name,
                    cfg.handbook.display()
                );
            }
        }
    }
    Ok((Arc::new(handbook), Arc::new(schema)))
}

/// Starts the engine thread for `cfg`.
pub fn start_engine(cfg: &Config) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    EngineHandle::spawn(EngineConfig {
        model_path: cfg.model.path.clone(),
        requantize: cfg.model.requantize,
        device: cfg.model.device.clone(),
        dtype: cfg.model.parse_dtype().map_err(anyhow::Error::msg)?,
        image_max_pixels: cfg.model.image_max_pixels,
        max_batch: cfg.model.max_batch,
        max_batch_tokens: cfg.model.max_batch_tokens,
        prefix_cache_entries: cfg.model.prefix_cache_entries,
        queue_capacity: cfg.model.queue_capacity,
        context_tokens: cfg.model.context_tokens,
        adapter: cfg.model.adapter_dir(),
    })
    .context("starting the engine thread")
}

/// Runs the server on `listener` until `shutdown` completes, then drains: health goes NOT_SERVING,
/// new connections are refused, in-flight calls get `server.shutdown_grace_secs` to finish.
/// Everything is validated and opened before the first connection is accepted.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let (handbook, schema) = load_guidance(&cfg)?;
    let tokens = crate::grpc::auth::Tokens::load(cfg.auth.token_file.as_deref())?;
    let tls = tls_config(&cfg.tls)?;
    let data_dir = cfg.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || RedbStore::open(&data_dir))
        .await?
        .context("opening the store")?;
    let notes = Arc::new(NoteCache::new(
        Arc::new(store),
        schema.clone(),
        cfg.cache.max_notes,
        cfg.cache.record_hits_every,
    ));
    crate::metrics::install();
    // Bound before anything is served, so a taken port fails the start, not a scrape later.
    let metrics_listener = match cfg.server.metrics_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics endpoint {a}"))?,
        ),
        None => None,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let dec = cfg.server.max_decoding_message_bytes;
    let enc = cfg.server.max_encoding_message_bytes;

    // A primary runs the engine and serves TagService; a replica follows a primary instead.
    // Either way a background task drives health: `watcher` (engine state) or the follower.
    let mut engine_parts = None;
    let mut follow_task = None;
    let mut tag_service = None;
    let background: tokio::task::JoinHandle<()>;
    let model_version: crate::grpc::ModelVersion;
    if cfg.replica.enabled() {
        let follower = Follower::new(cfg.replica.clone(), notes.clone(), handbook.clone());
        let mv = follower.model_version.clone();
        model_version = Arc::new(move || mv.read().map(|m| m.clone()).unwrap_or_default());
        // Until the first catch-up a replica would answer `found = false` for notes that exist.
        health
            .set_service_status(FEATURE_SERVICE, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let mut states = follower.watch();
        let h = health.clone();
        follow_task = Some(tokio::spawn(follower.run()));
        background = tokio::spawn(async move {
            loop {
                let status = match &*states.borrow_and_update() {
                    ReplicaState::Following => ServingStatus::Serving,
                    ReplicaState::CatchingUp | ReplicaState::Mismatched(_) => {
                        ServingStatus::NotServing
                    }
                };
                h.set_service_status(FEATURE_SERVICE, status).await;
                h.set_service_status("", status).await;
                if states.changed().await.is_err() {
                    break;
                }
            }
        });
    } else {
        let (engine, engine_thread) = start_engine(&cfg)?;
        metrics::gauge!("tagllm_engine_queue_capacity").set(cfg.model.queue_capacity as f64);
        let tagger = Tagger::new(
            handbook.clone(),
            engine.clone(),
            cfg.limits.clone(),
            &cfg.model,
        );
        let t = tagger.clone();
        model_version = Arc::new(move || {
            t.versions()
                .map(|v| v.model)
                .unwrap_or_else(|_| "(loading)".into())
        });
        health
            .set_service_status(FEATURE_SERVICE, ServingStatus::Serving)
            .await;
        health
            .set_service_status(TAG_SERVICE, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        // Follow the engine: SERVING once the model is loaded and warm.
        let mut states = engine.watch();
        let h = health.clone();
        background = tokio::spawn(async move {
            loop {
                let status = match &*states.borrow_and_update() {
                    EngineState::Ready(_) => ServingStatus::Serving,
                    EngineState::Failed(e) => {
                        tracing::error!(error = %e, "tagging unavailable");
                        ServingStatus::NotServing
                    }
                    EngineState::Loading => ServingStatus::NotServing,
                };
                metrics::gauge!("tagllm_model_ready").set(if status == ServingStatus::Serving {
                    1.0
                } else {
                    0.0
                });
                h.set_service_status(TAG_SERVICE, status).await;
                h.set_service_status("", status).await;
                if states.changed().await.is_err() {
                    break;
                }
            }
        });
        tag_service = Some(
            pb::tag_service_server::TagServiceServer::new(TagApi::new(
                tagger.clone(),
                notes.clone(),
                cfg.limits.clone(),
                cfg.server.stream_concurrency,
            ))
            .max_decoding_message_size(dec)
            .max_encoding_message_size(enc),
        );
        engine_parts = Some((tagger, engine, engine_thread));
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let feature_service = pb::feature_service_server::FeatureServiceServer::new(FeatureApi::new(
        notes.clone(),
        handbook.clone(),
        model_version,
        cfg.limits.clone(),
    ))
    .max_decoding_message_size(dec)
    .max_encoding_message_size(enc);

    let addr = listener.local_addr()?;
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = match metrics_listener {
        Some(l) => {
            let maddr = l.local_addr()?;
            tracing::info!(addr = %maddr, "metrics at http://{maddr}/metrics");
            Some(tokio::spawn(crate::metrics::serve(l, async {
                let _ = metrics_stopped.await;
            })))
        }
        None => None,
    };
    match (&tokens, &tls) {
        (Some(_), Some(_)) => tracing::info!("auth: bearer token required (health exempt); TLS on"),
        (Some(_), None) => tracing::warn!("auth: bearer token required, but without TLS the token crosses the network in clear text"),
        (None, Some(_)) => tracing::info!("TLS on; no auth"),
        (None, None) if !addr.ip().is_loopback() => {
            tracing::warn!(%addr, "listening beyond loopback with neither auth nor TLS")
        }
        (None, None) => {}
    }
    if cfg.replica.enabled() {
        tracing::info!(%addr, upstream = %cfg.replica.upstream, data_dir = %cfg.data_dir.display(), "serving as a read replica");
    } else {
        tracing::info!(%addr, model = %cfg.model.path.display(), data_dir = %cfg.data_dir.display(), "serving");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The block owns the server future: leaving it drops every service and its handles.
    {
        let mut builder = tonic::transport::Server::builder();
        if let Some(secs) = cfg.server.max_connection_age_secs {
            // Clients re-resolve and reconnect, so pods added by a scale-up get traffic.
            builder = builder.max_connection_age(Duration::from_secs(secs));
        }
        if let Some(t) = tls {
            builder = builder.tls_config(t).context("configuring TLS")?;
        }
        // Metrics outermost, so refused calls are counted with their status.
        let server = builder
            .layer(crate::metrics::GrpcMetricsLayer)
            .layer(crate::grpc::auth::AuthLayer::new(tokens))
            .layer(crate::grpc::SizeStatusLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_optional_service(tag_service)
            .add_service(feature_service)
            // TCP_NODELAY: without it a response's last small segment waits for the client's
            // delayed ACK (~40 ms on Linux), which a one-call-at-a-time reader always hits.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stop_rx.await;
                },
            );
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r?,
            () = shutdown => {
                tracing::info!("shutting down: draining in-flight calls");
                background.abort();
                health.set_service_status("", ServingStatus::NotServing).await;
                health.set_service_status(TAG_SERVICE, ServingStatus::NotServing).await;
                health.set_service_status(FEATURE_SERVICE, ServingStatus::NotServing).await;
                let _ = stop_tx.send(());
                let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(r) => r?,
                    Err(_) => tracing::warn!(grace_secs = grace.as_secs(), "grace period over: closing remaining calls"),
                }
            }
        }
    }
    background.abort();
    // The follower holds the store: stop it, so a restart in the same process can open it.
    if let Some(f) = follow_task {
        f.abort();
        let _ = f.await;
    }
    // Dropping the last engine handle ends the engine thread; wait for it so that a restart in
    // the same process finds the model and the store released.
    if let Some((tagger, engine, engine_thread)) = engine_parts {
        drop(tagger);
        drop(engine);
        let join = tokio::task::spawn_blocking(move || engine_thread.join());
        if tokio::time::timeout(Duration::from_secs(10), join)
            .await
            .is_err()
        {
            tracing::warn!("engine thread still busy after shutdown");
        }
    }
    // Metrics stay up while draining, so the drain itself can be watched.
    let _ = metrics_stop.send(());
    if let Some(t) = metrics_task {
        match t.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint failed"),
            Err(e) => tracing::warn!(error = %e, "metrics endpoint task failed"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The rustls server config from PEM files (`None`: plaintext).
fn tls_config(
    t: &crate::config::TlsConfig,
) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
        return Ok(None);
    };
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).with_context(|| format!("tls.{what} {}", p.display()))
    };
    let mut c = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read(cert, "cert_file")?, read(key, "key_file")?),
    );
    if let Some(ca) = &t.client_ca_file {
        c = c.client_ca_root(tonic::transport::Certificate::from_pem(read(
            ca,
            "client_ca_file",
        )?));
    }
    Ok(Some(c))
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
