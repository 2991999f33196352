//! `tagllm.v1.TagService`: TagNote and the TagNotes bulk stream.

use std::{pin::Pin, sync::Arc};

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{note_features_to_proto, note_from_proto, pb, tag_to_proto};
use crate::{
    domain::error::Error,
    domain::Limits,
    store::NoteCache,
    tagging::tagger::{TagOutcome, Tagger},
};

/// The TagService implementation.
#[derive(Clone)]
pub struct TagApi {
    tagger: Tagger,
    notes: Arc<NoteCache>,
    limits: Limits,
    stream_concurrency: usize,
}

impl TagApi {
    /// A service over the tagger and the note store.
    pub fn new(
        tagger: Tagger,
        notes: Arc<NoteCache>,
        limits: Limits,
        stream_concurrency: usize,
    ) -> TagApi {
        TagApi {
            tagger,
            notes,
            limits,
            stream_concurrency,
        }
    }

    async fn tag_one(&self, req: pb::TagNoteRequest) -> Result<pb::TagNoteResponse, Error> {
        let note = note_from_proto(req.note, &self.limits)?;
        tracing::Span::current().record("note_id", note.id.as_str());
        let (note, _images) =
            crate::tagging::images::check_note_blocking(note, &self.limits).await?;
        let out = self.tagger.tag(note, req.force, &self.notes).await?;
        Ok(self.response(out, req.include_raw_output))
    }

    fn response(&self, out: TagOutcome, include_raw_output: bool) -> pb::TagNoteResponse {
        let schema = self.notes.schema();
        let all: Vec<usize> = (0..schema.groups.len()).collect();
        let e = &out.entry;
        pb::TagNoteResponse {
            note_id: e.record.note_id.clone(),
            tags: e.record.tags.iter().map(tag_to_proto).collect(),
            features: Some(note_features_to_proto(e, schema, &all, true)),
            reused: out.reused,
            raw_output: if include_raw_output {
                e.record.raw_output.clone()
            } else {
                String::new()
            },
            timings: Some(pb::Timings {
                queue_ms: out.timings.queue_ms,
                prefill_ms: out.timings.prefill_ms,
                decode_ms: out.timings.decode_ms,
                total_ms: out.timings.total_ms,
                prompt_tokens: out.timings.prompt_tokens,
                generated_tokens: out.timings.generated_tokens,
                cached_prompt_tokens: out.timings.cached_prompt_tokens,
            }),
            error: None,
            warnings: out.warnings,
            images_used: out.images_used,
            dropped_tags: e.record.dropped_tags,
        }
    }
}

type TagStream = Pin<Box<dyn Stream<Item = Result<pb::TagNoteResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::tag_service_server::TagService for TagApi {
    #[tracing::instrument(skip_all, fields(note_id))]
    async fn tag_note(
        &self,
        req: Request<pb::TagNoteRequest>,
    ) -> Result<Response<pb::TagNoteResponse>, Status> {
        let res = self.tag_one(req.into_inner()).await;
        if let Err(e) = &res {
            tracing::info!(error = %e, "TagNote refused");
        }
        Ok(Response::new(res?))
    }

    type TagNotesStream = TagStream;

    #[tracing::instrument(skip_all)]
    async fn tag_notes(
        &self,
        req: Request<Streaming<pb::TagNoteRequest>>,
    ) -> Result<Response<Self::TagNotesStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) =
            mpsc::channel::<Result<pb::TagNoteResponse, Status>>(self.stream_concurrency * 2);
        let api = self.clone();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(api.stream_concurrency));
            while let Some(msg) = inbound.next().await {
                let req = match msg {
                    Ok(r) => r,
                    Err(status) => {
                        // The inbound stream itself broke (not one bad note): end with its status.
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let api = api.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let note_id = req
                        .note
                        .as_ref()
                        .map(|n| n.note_id.clone())
                        .unwrap_or_default();
                    let item = match api.tag_one(req).await {
                        Ok(r) => r,
                        Err(e) => {
                            let status = Status::from(e);
                            pb::TagNoteResponse {
                                note_id,
                                error: Some(pb::NoteError {
                                    code: status.code() as i32,
                                    message: status.message().to_string(),
                                }),
                                ..Default::default()
                            }
                        }
                    };
                    let _ = tx.send(Ok(item)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
