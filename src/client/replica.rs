//! Read replica: keeps the local store in step with a primary by following the primary's
//! `ScanNoteFeatures` by tagging time, so feature reads scale out while one primary tags.
//!
//! Each poll asks for the notes tagged since the newest one held, minus `replica.overlap_ms`
//! (a note's tagging time is taken just before its commit; the overlap re-reads that window so a
//! late commit is not skipped). The primary answers from its time index, so a poll costs the new
//! notes, not the store. Writes are idempotent (a note is replaced by id), so re-reading is
//! harmless. A replica holds tags, not features: it computes features with its own schema, which
//! must be the primary's (checked on every poll, with the handbook version).

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tokio_stream::StreamExt;

use super::upstream::ClientTls;
use crate::{
    domain::{now_ms, Versions},
    grpc::pb,
    store::{NoteCache, StoredNote},
    tagging::handbook::Handbook,
};

/// A read replica serves FeatureService only, from its own store, which it keeps in step with a
/// primary (`upstream`) by following the primary's ScanNoteFeatures by tagging time. It loads no
/// model. Several replicas scale feature reads while one primary tags (the store is an embedded
/// single-writer database, never shared between processes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// The primary's address (`http://host:50051`); empty: this server is a primary.
    pub upstream: String,
    /// Seconds between polls once caught up.
    pub poll_secs: u64,
    /// How far back each poll re-reads (ms), so a note whose tagging time was taken just before
    /// a poll but committed just after it is not missed.
    pub overlap_ms: i64,
    /// TLS to an `https://` upstream: `ca_file`, and `cert_file` + `key_file` for mutual TLS.
    pub tls: ClientTls,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            upstream: String::new(),
            poll_secs: 5,
            overlap_ms: 10_000,
            tls: ClientTls::default(),
        }
    }
}

impl ReplicaConfig {
    /// Whether this server is a read replica.
    pub fn enabled(&self) -> bool {
        !self.upstream.trim().is_empty()
    }
}

/// The primary's FeatureService, with the bearer token from `TAGLLM_AUTH_TOKEN` when set.
type Upstream = pb::feature_service_client::FeatureServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::grpc::auth::BearerInterceptor,
    >,
>;

/// Notes per local commit while catching up.
const BATCH: usize = 256;

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The primary is unreachable or broke the stream: retried with backoff.
    #[error("upstream {0}")]
    Upstream(String),
    /// The primary tags with another schema or handbook: this replica would serve wrong ids.
    #[error(
        "upstream has {what} {theirs:?}, this replica {ours:?}: deploy the same files to both"
    )]
    Mismatch {
        /// `schema` or `handbook`.
        what: &'static str,
        /// The primary's version.
        theirs: String,
        /// This replica's version.
        ours: String,
    },
    /// The local store failed.
    #[error("local store: {0}")]
    Store(String),
}

/// Where a replica stands; the server's health follows it.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaState {
    /// Not yet caught up since start.
    CatchingUp,
    /// Caught up at least once; serving (a later poll failure keeps serving slightly stale data).
    Following,
    /// Refusing to serve: versions differ from the primary's.
    Mismatched(String),
}

/// The follower's shared outputs.
pub struct Follower {
    cfg: ReplicaConfig,
    notes: Arc<NoteCache>,
    handbook: Arc<Handbook>,
    /// The primary's model version (GetFeatureSchema reports it).
    pub model_version: Arc<RwLock<String>>,
    state: watch::Sender<ReplicaState>,
}

impl Follower {
    /// A follower for `notes` (not started).
    pub fn new(cfg: ReplicaConfig, notes: Arc<NoteCache>, handbook: Arc<Handbook>) -> Follower {
        Follower {
            cfg,
            notes,
            handbook,
            model_version: Arc::new(RwLock::new("(replica: not synced yet)".into())),
            state: watch::channel(ReplicaState::CatchingUp).0,
        }
    }

    /// State changes.
    pub fn watch(&self) -> watch::Receiver<ReplicaState> {
        self.state.subscribe()
    }

    /// Follows the primary until the task is dropped: polls every `poll_secs`, backs off (up to
    /// 30 s) while the primary is away.
    pub async fn run(self) {
        let mut client = None;
        let mut backoff = Duration::from_secs(1);
        let upstream = self.cfg.upstream.trim().to_string();
        loop {
            match self.poll(&mut client).await {
                Ok(applied) => {
                    backoff = Duration::from_secs(1);
                    if *self.state.borrow() != ReplicaState::Following {
                        tracing::info!(%upstream, applied, "replica caught up");
                    }
                    self.state.send_replace(ReplicaState::Following);
                    metrics::gauge!("tagllm_replica_last_sync_timestamp_seconds")
                        .set(now_ms() as f64 / 1e3);
                    tokio::time::sleep(Duration::from_secs(self.cfg.poll_secs)).await;
                }
                Err(e) => {
                    metrics::counter!("tagllm_replica_poll_errors_total").increment(1);
                    if let FollowError::Mismatch { .. } = e {
                        tracing::error!(%upstream, error = %e, "replica refuses to serve");
                        self.state
                            .send_replace(ReplicaState::Mismatched(e.to_string()));
                    } else {
                        tracing::warn!(%upstream, error = %e, retry_in_secs = backoff.as_secs(), "replica poll failed");
                        client = None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// One poll: check versions, then apply every note tagged since the newest held (minus the
    /// overlap). Returns the notes applied.
    async fn poll(&self, client: &mut Option<Upstream>) -> Result<usize, FollowError> {
        let up = |e: &dyn std::fmt::Display| FollowError::Upstream(e.to_string());
        if client.is_none() {
            let channel = crate::client::upstream::connect(&self.cfg.upstream, &self.cfg.tls)
                .await
                .map_err(|e| FollowError::Upstream(format!("{e:#}")))?;
            let auth = crate::grpc::auth::BearerInterceptor::from_env()
                .map_err(|e| FollowError::Upstream(e.to_string()))?;
            *client = Some(
                pb::feature_service_client::FeatureServiceClient::with_interceptor(channel, auth)
                    .max_decoding_message_size(64 << 20),
            );
        }
        let Some(c) = client.as_mut() else {
            return Err(FollowError::Upstream("not connected".into()));
        };
        let schema = c
            .get_feature_schema(pb::GetFeatureSchemaRequest {})
            .await
            .map_err(|e| up(&e))?
            .into_inner();
        let v = schema.versions.unwrap_or_default();
        let ours = self.notes.schema();
        if v.schema != ours.version {
            return Err(FollowError::Mismatch {
                what: "schema",
                theirs: v.schema,
                ours: ours.version.clone(),
            });
        }
        if v.handbook != self.handbook.version {
            return Err(FollowError::Mismatch {
                what: "handbook",
                theirs: v.handbook,
                ours: self.handbook.version.clone(),
            });
        }
        if let Ok(mut m) = self.model_version.write() {
            *m = v.model;
        }

        let notes = self.notes.clone();
        let newest = tokio::task::spawn_blocking(move || notes.store().latest_tagged_at())
            .await
            .map_err(|e| FollowError::Store(e.to_string()))?
            .map_err(|e| FollowError::Store(e.to_string()))?;
        // 0 asks for everything (the first sync of an empty replica).
        let since = newest.map_or(0, |t| (t - self.cfg.overlap_ms).max(1));
        let mut stream = c
            .scan_note_features(pb::ScanNoteFeaturesRequest {
                tagged_since_ms: since,
                include_tags: true,
                // Tags are what a replica stores; one group keeps the messages small.
                groups: ours
                    .groups
                    .first()
                    .map(|g| g.name.clone())
                    .into_iter()
                    .collect(),
                ..Default::default()
            })
            .await
            .map_err(|e| up(&e))?
            .into_inner();
        let mut batch = Vec::with_capacity(BATCH);
        let mut applied = 0;
        loop {
            let item = stream.next().await;
            let done = match item {
                Some(Ok(nf)) => {
                    batch.push(self.record(nf));
                    false
                }
                Some(Err(status)) => return Err(up(&status)),
                None => true,
            };
            if batch.len() >= BATCH || (done && !batch.is_empty()) {
                let n = batch.len();
                applied += n;
                let records = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                let notes = self.notes.clone();
                tokio::task::spawn_blocking(move || notes.put_many(records))
                    .await
                    .map_err(|e| FollowError::Store(e.to_string()))?
                    .map_err(|e| FollowError::Store(e.to_string()))?;
                metrics::counter!("tagllm_replica_notes_applied_total").increment(n as u64);
            }
            if done {
                return Ok(applied);
            }
        }
    }

    /// A primary's note as a local record: tags and versions; no generation details.
    fn record(&self, nf: pb::NoteFeatures) -> StoredNote {
        let v = nf.versions.unwrap_or_default();
        StoredNote {
            handbook_category: self.handbook.resolve(&nf.category).key.clone(),
            note_id: nf.note_id,
            category: nf.category,
            // A replica never tags, so it never compares content.
            content_hash: String::new(),
            versions: Versions {
                model: v.model,
                handbook: v.handbook,
            },
            tags: nf
                .tags
                .into_iter()
                .map(crate::grpc::tag_from_proto)
                .collect(),
            tagged_at_ms: nf.tagged_at_ms,
            raw_output: String::new(),
            dropped_tags: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
        }
    }
}
