//! `tagllm.v1.FeatureService`: the ranking-time batch read, the bulk scan, the schema.

use std::{pin::Pin, sync::Arc};

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use super::{note_features_to_proto, pb, select_groups, wire::Encoded};
use crate::{
    domain::error::Error,
    domain::Limits,
    domain::NoteId,
    features::IdMap,
    store::{CachedNote, NoteCache},
    tagging::handbook::Handbook,
};

/// The model version GetFeatureSchema reports: the tagger's (a primary) or the upstream's (a
/// replica), read when asked.
pub type ModelVersion = Arc<dyn Fn() -> String + Send + Sync>;

/// Notes per store page of a scan.
const SCAN_PAGE: usize = 256;

/// The FeatureService implementation.
#[derive(Clone)]
pub struct FeatureApi {
    notes: Arc<NoteCache>,
    handbook: Arc<Handbook>,
    model_version: ModelVersion,
    limits: Limits,
}

impl FeatureApi {
    /// A service over the note store.
    pub fn new(
        notes: Arc<NoteCache>,
        handbook: Arc<Handbook>,
        model_version: ModelVersion,
        limits: Limits,
    ) -> FeatureApi {
        FeatureApi {
            notes,
            handbook,
            model_version,
            limits,
        }
    }

    async fn get(
        &self,
        req: pb::GetNoteFeaturesRequest,
    ) -> Result<pb::GetNoteFeaturesResponse, Error> {
        let n = req.note_ids.len();
        if n > self.limits.max_ids_per_request {
            return Err(Error::invalid(
                "note_ids",
                format!(
                    "has {n} ids, over the limit of {}",
                    self.limits.max_ids_per_request
                ),
            ));
        }
        for (i, id) in req.note_ids.iter().enumerate() {
            NoteId::check(id, &self.limits)
                .map_err(|reason| Error::invalid(format!("note_ids[{i}]"), reason))?;
        }
        let layout = pb::Layout::try_from(req.layout)
            .map_err(|_| Error::invalid("layout", format!("unknown layout {}", req.layout)))?;
        let schema = self.notes.schema().clone();
        let groups = select_groups(&schema, &req.groups)?;
        let ids: Vec<&str> = req.note_ids.iter().map(String::as_str).collect();
        // Hits are served on this thread; only misses go to the blocking pool.
        let mut found = self.notes.get_cached(&ids);
        if found.iter().any(Option::is_none) {
            let notes = self.notes.clone();
            let owned = req.note_ids.clone();
            found = tokio::task::spawn_blocking(move || {
                let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
                notes.fill_from_store(&ids, &mut found).map(|()| found)
            })
            .await
            .map_err(Error::internal)?
            .map_err(Error::internal)?;
        }
        Ok(match layout {
            pb::Layout::NoteMajor => {
                // The common form (every group, no tags) is encoded once per cached note; any
                // other form is encoded for this call.
                let mut named = vec![false; schema.groups.len()];
                groups.iter().for_each(|&g| named[g] = true);
                let common = !req.include_tags && named.iter().all(|&n| n);
                let encode = |e: &CachedNote| -> Bytes {
                    note_features_to_proto(e, &schema, &groups, req.include_tags)
                        .encode_to_vec()
                        .into()
                };
                pb::GetNoteFeaturesResponse {
                    encoded_notes: req
                        .note_ids
                        .iter()
                        .zip(found)
                        .map(|(id, f)| match f {
                            Some(e) if common => Encoded::cached(e, encode),
                            Some(e) => Encoded::bytes(encode(&e)),
                            None => Encoded::bytes(
                                pb::NoteFeatures {
                                    note_id: id.clone(),
                                    found: false,
                                    ..Default::default()
                                }
                                .encode_to_vec()
                                .into(),
                            ),
                        })
                        .collect(),
                    ..Default::default()
                }
            }
            pb::Layout::Jagged => pb::GetNoteFeaturesResponse {
                jagged: Some(jagged(&req.note_ids, &found, &schema, &groups)),
                ..Default::default()
            },
        })
    }
}

/// The KeyedJaggedTensor layout: per group, one length per requested note and flat values.
fn jagged(
    ids: &[String],
    found: &[Option<Arc<CachedNote>>],
    schema: &crate::features::Schema,
    groups: &[usize],
) -> pb::JaggedFeatures {
    pb::JaggedFeatures {
        note_ids: ids.to_vec(),
        found: found.iter().map(Option::is_some).collect(),
        groups: groups
            .iter()
            .map(|&g| {
                let total: usize = found
                    .iter()
                    .flatten()
                    .map(|e| e.features[g].ids.len())
                    .sum();
                let mut out = pb::JaggedGroup {
                    name: schema.groups[g].name.clone(),
                    lengths: Vec::with_capacity(found.len()),
                    values: Vec::with_capacity(total),
                    weights: Vec::with_capacity(total),
                };
                for f in found {
                    match f {
                        Some(e) => {
                            let feat = &e.features[g];
                            out.lengths.push(feat.ids.len() as i32);
                            out.values.extend_from_slice(&feat.ids);
                            out.weights.extend_from_slice(&feat.weights);
                        }
                        None => out.lengths.push(0),
                    }
                }
                out
            })
            .collect(),
    }
}

/// The first few ids of a batch for a span: enough to find a request in the logs, bounded in size.
fn id_sample(ids: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut out = ids
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",");
    if ids.len() > SHOWN {
        out.push_str(&format!(",... (+{})", ids.len() - SHOWN));
    }
    out
}

type ScanStream = Pin<Box<dyn Stream<Item = Result<pb::NoteFeatures, Status>> + Send>>;

#[tonic::async_trait]
impl pb::feature_service_server::FeatureService for FeatureApi {
    #[tracing::instrument(skip_all, fields(n = req.get_ref().note_ids.len(), note_ids))]
    async fn get_note_features(
        &self,
        req: Request<pb::GetNoteFeaturesRequest>,
    ) -> Result<Response<pb::GetNoteFeaturesResponse>, Status> {
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("note_ids", id_sample(&req.get_ref().note_ids).as_str());
        }
        let res = self.get(req.into_inner()).await;
        if let Err(e) = &res {
            tracing::info!(error = %e, "GetNoteFeatures refused");
        }
        Ok(Response::new(res?))
    }

    type ScanNoteFeaturesStream = ScanStream;

    #[tracing::instrument(skip_all, fields(category = %req.get_ref().category, tagged_since_ms = req.get_ref().tagged_since_ms))]
    async fn scan_note_features(
        &self,
        req: Request<pb::ScanNoteFeaturesRequest>,
    ) -> Result<Response<Self::ScanNoteFeaturesStream>, Status> {
        let req = req.into_inner();
        let schema = self.notes.schema().clone();
        let groups = select_groups(&schema, &req.groups)?;
        let category = req.category.trim().to_lowercase();
        let limit = if req.limit == 0 { u64::MAX } else { req.limit };
        let (tx, rx) = mpsc::channel(SCAN_PAGE);
        let notes = self.notes.clone();
        let since = req.tagged_since_ms;
        tokio::spawn(async move {
            // With a time filter the store's time index serves only the notes asked for (what a
            // replica following the primary needs); without one, a full scan in id order.
            let mut after_id: Option<String> = None;
            let mut after_time: Option<(i64, String)> = None;
            let mut sent = 0u64;
            loop {
                let n2 = notes.clone();
                let (a_id, a_time) = (after_id.clone(), after_time.clone());
                let page = match tokio::task::spawn_blocking(move || {
                    if since > 0 {
                        n2.scan_since(
                            since,
                            a_time.as_ref().map(|(t, id)| (*t, id.as_str())),
                            SCAN_PAGE,
                        )
                    } else {
                        n2.scan_page(a_id.as_deref(), SCAN_PAGE)
                    }
                })
                .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(Status::from(Error::internal(e)))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(Error::internal(e)))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { return };
                after_id = Some(last.record.note_id.clone());
                after_time = Some((last.record.tagged_at_ms, last.record.note_id.clone()));
                for e in &page {
                    let r = &e.record;
                    if (!category.is_empty()
                        && r.category.to_lowercase() != category
                        && r.handbook_category != category)
                        || r.tagged_at_ms < req.tagged_since_ms
                    {
                        continue;
                    }
                    let item = note_features_to_proto(e, &schema, &groups, req.include_tags);
                    if tx.send(Ok(item)).await.is_err() {
                        return; // the client went away
                    }
                    sent += 1;
                    if sent >= limit {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_feature_schema(
        &self,
        _req: Request<pb::GetFeatureSchemaRequest>,
    ) -> Result<Response<pb::GetFeatureSchemaResponse>, Status> {
        let schema = self.notes.schema();
        let model = (self.model_version)();
        Ok(Response::new(pb::GetFeatureSchemaResponse {
            groups: schema
                .groups
                .iter()
                .map(|g| {
                    let (id_kind, vocab_size, oov_buckets, hash_buckets) = match &g.ids {
                        IdMap::Vocab {
                            size, oov_buckets, ..
                        } => (pb::IdKind::Vocab, *size, *oov_buckets, 0),
                        IdMap::Hash { buckets } => (pb::IdKind::Hash, 0, 0, *buckets),
                    };
                    pb::FeatureGroupSchema {
                        name: g.name.clone(),
                        dimensions: if g.dimensions.is_empty() {
                            vec!["*".into()]
                        } else {
                            g.dimensions.clone()
                        },
                        id_kind: id_kind as i32,
                        vocab_size,
                        oov_buckets,
                        hash_buckets,
                        id_space: g.id_space(),
                        weight: g.weight.as_str().into(),
                        hash_seed: crate::features::HASH_SEED,
                    }
                })
                .collect(),
            versions: Some(pb::Versions {
                model,
                handbook: self.handbook.version.clone(),
                schema: schema.version.clone(),
            }),
            categories: std::iter::once(&self.handbook.fallback)
                .chain(self.handbook.categories.iter())
                .map(|c| pb::CategorySchema {
                    key: c.key.clone(),
                    dimensions: c.dimensions.iter().map(|d| d.key.clone()).collect(),
                })
                .collect(),
        }))
    }
}
