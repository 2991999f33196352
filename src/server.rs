//! Builds and runs the app: loads and cross-checks handbook and schema, opens the store, starts the
//! engine, serves both services with health (NOT_SERVING until the model is warm) and reflection
//! (v1 and v1alpha), explicit message limits, and graceful shutdown with a grace period.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tonic_health::{server::HealthReporter, ServingStatus};

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
    let known = |d: &str| {
        std::iter::once(&handbook.fallback)
            .chain(&handbook.categories)
            .any(|c| c.has_dimension(d))
    };
    for (i, g) in schema.groups.iter().enumerate() {
        for d in &g.dimensions {
            if !known(d) {
                anyhow::bail!(
                    "schema {}: group[{i}] {:?}: dimension {d:?} is in no category of handbook {}",
                    cfg.schema.display(),
                    g.name,
                    cfg.handbook.display()
                );
            }
        }
    }
    if let Some(d) = schema.canonical.dimensions().find(|d| !known(d)) {
        anyhow::bail!(
            "schema {}: canonical.{d}: dimension {d:?} is in no category of handbook {}",
            cfg.schema.display(),
            cfg.handbook.display()
        );
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
    // Either way a background task drives health.
    let role = if cfg.replica.enabled() {
        Role::replica(&cfg, notes.clone(), handbook.clone(), &health).await
    } else {
        Role::primary(&cfg, handbook.clone(), &health).await?
    };
    let tag_service = role.tagger.clone().map(|tagger| {
        pb::tag_service_server::TagServiceServer::new(TagApi::new(
            tagger,
            notes.clone(),
            cfg.limits.clone(),
            cfg.server.stream_concurrency,
        ))
        .max_decoding_message_size(dec)
        .max_encoding_message_size(enc)
    });

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
        role.model_version.clone(),
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
    log_security(tokens.is_some(), tls.is_some(), addr);
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
                role.background.abort();
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
    role.stop().await;
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

/// What distinguishes a primary from a read replica: the tagger (primary only), where the model
/// version comes from, the task that drives health, and what to stop on shutdown.
struct Role {
    tagger: Option<Tagger>,
    model_version: crate::grpc::ModelVersion,
    /// Drives health from the engine's state (primary) or the follower's (replica).
    background: tokio::task::JoinHandle<()>,
    /// The replica's follower task.
    follow_task: Option<tokio::task::JoinHandle<()>>,
    /// The primary's engine handle and thread.
    engine: Option<(EngineHandle, std::thread::JoinHandle<()>)>,
}

impl Role {
    /// A read replica: follows the primary into the local store; NOT_SERVING until its first
    /// catch-up (before it, it would answer `found = false` for notes that exist).
    async fn replica(
        cfg: &Config,
        notes: Arc<NoteCache>,
        handbook: Arc<Handbook>,
        health: &HealthReporter,
    ) -> Role {
        let follower = Follower::new(cfg.replica.clone(), notes, handbook);
        let mv = follower.model_version.clone();
        let model_version: crate::grpc::ModelVersion =
            Arc::new(move || mv.read().map(|m| m.clone()).unwrap_or_default());
        health
            .set_service_status(FEATURE_SERVICE, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let states = follower.watch();
        let follow_task = Some(tokio::spawn(follower.run()));
        let background = drive_health(health, FEATURE_SERVICE, states, |state| match state {
            ReplicaState::Following => ServingStatus::Serving,
            ReplicaState::CatchingUp | ReplicaState::Mismatched(_) => ServingStatus::NotServing,
        });
        Role {
            tagger: None,
            model_version,
            background,
            follow_task,
            engine: None,
        }
    }

    /// A primary: starts the engine (it loads the model in the background); TagService is
    /// NOT_SERVING until the model is loaded and warm, FeatureService serves at once.
    async fn primary(
        cfg: &Config,
        handbook: Arc<Handbook>,
        health: &HealthReporter,
    ) -> anyhow::Result<Role> {
        let (engine, engine_thread) = start_engine(cfg)?;
        metrics::gauge!("tagllm_engine_queue_capacity").set(cfg.model.queue_capacity as f64);
        let tagger = Tagger::new(
            handbook,
            engine.clone(),
            cfg.limits.clone(),
            cfg.model.decoding,
            cfg.model.max_new_tokens,
        )
        .with_prompt(cfg.model.prompt_style().map_err(anyhow::Error::msg)?);
        let t = tagger.clone();
        let model_version: crate::grpc::ModelVersion = Arc::new(move || {
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
        let background = drive_health(health, TAG_SERVICE, engine.watch(), |state| {
            let status = match state {
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
            status
        });
        Ok(Role {
            tagger: Some(tagger),
            model_version,
            background,
            follow_task: None,
            engine: Some((engine, engine_thread)),
        })
    }

    /// Stops the background tasks and releases the store and the model, so that a restart in
    /// the same process can open them again.
    async fn stop(self) {
        self.background.abort();
        // The follower holds the store.
        if let Some(f) = self.follow_task {
            f.abort();
            let _ = f.await;
        }
        // Dropping the last engine handle (the tagger holds one too) ends the engine thread;
        // wait for it, so the model and the store are released.
        drop(self.tagger);
        drop(self.model_version);
        if let Some((engine, engine_thread)) = self.engine {
            drop(engine);
            let join = tokio::task::spawn_blocking(move || engine_thread.join());
            if tokio::time::timeout(Duration::from_secs(10), join)
                .await
                .is_err()
            {
                tracing::warn!("engine thread still busy after shutdown");
            }
        }
    }
}

/// A task that sets `service` and the whole server (`""`) to the status `status_of` gives each
/// state `states` takes, from the current one on, until the sender is gone.
fn drive_health<S: Send + Sync + 'static>(
    health: &HealthReporter,
    service: &'static str,
    mut states: tokio::sync::watch::Receiver<S>,
    status_of: impl Fn(&S) -> ServingStatus + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let h = health.clone();
    tokio::spawn(async move {
        loop {
            let status = status_of(&states.borrow_and_update());
            h.set_service_status(service, status).await;
            h.set_service_status("", status).await;
            if states.changed().await.is_err() {
                break;
            }
        }
    })
}

/// Says how the listener is protected, and warns where it is not.
fn log_security(auth: bool, tls: bool, addr: std::net::SocketAddr) {
    match (auth, tls) {
        (true, true) => tracing::info!("auth: bearer token required (health exempt); TLS on"),
        (true, false) => tracing::warn!("auth: bearer token required, but without TLS the token crosses the network in clear text"),
        (false, true) => tracing::info!("TLS on; no auth"),
        (false, false) if !addr.ip().is_loopback() => {
            tracing::warn!(%addr, "listening beyond loopback with neither auth nor TLS")
        }
        (false, false) => {}
    }
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
