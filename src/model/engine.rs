//! The engine: one OS thread owns the model and serves generation jobs from a bounded queue, so
//! candle never runs on a Tokio worker and a full queue sheds load (`try_send`) instead of piling
//! up. The thread loads and warms the model first; [`EngineHandle::state`] says when it is ready.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    chat::Message, qwen3vl::image_proc::ProcessedImage, GenParams, Generation, LoadOptions,
    ModelError, ModelInfo, TextModel,
};
use crate::config::Requantize;

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// GGUF file.
    pub model_path: PathBuf,
    /// Weight format in memory.
    pub requantize: Requantize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Weight dtype of a checkpoint directory (`None`: by device).
    pub dtype: Option<candle_core::DType>,
    /// Pixel cap per image.
    pub image_max_pixels: usize,
    /// Waiting jobs before `try_submit` refuses.
    pub queue_capacity: usize,
    /// Prompt + generation limit.
    pub context_tokens: usize,
}

/// Where the engine is in its life.
#[derive(Debug, Clone)]
pub enum EngineState {
    /// Loading and warming the model.
    Loading,
    /// Serving jobs.
    Ready(Arc<ModelInfo>),
    /// Loading failed (the reason), or the thread ended.
    Failed(String),
}

/// One generation request.
pub struct Job {
    /// Chat messages (system, user).
    pub messages: Vec<Message>,
    /// Images for the messages' image slots, in order (multimodal models).
    pub images: Vec<ProcessedImage>,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Opening of the assistant turn (continued by generation).
    pub assistant_prefix: String,
    /// Grammar of the answer (`None`: unconstrained).
    pub grammar: Option<Arc<str>>,
    /// When it was queued.
    pub enqueued: Instant,
    /// Where the result goes; a closed receiver means the caller left, and the job is dropped.
    pub reply: oneshot::Sender<Result<JobOutput, ModelError>>,
}

/// A finished job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The generation.
    pub generation: Generation,
    /// Time spent waiting in the queue.
    pub queue: Duration,
    /// Whether the end of the note was cut to fit the context.
    pub truncated: bool,
}

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the tagging queue is full ({0} jobs waiting)")]
    QueueFull(usize),
    /// Not ready (loading, failed, or stopped).
    #[error("the model is not ready: {0}")]
    NotReady(String),
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    state: watch::Receiver<EngineState>,
    capacity: usize,
    context_tokens: usize,
}

impl EngineHandle {
    /// Starts the engine thread: it loads and warms the model, then serves jobs until every handle
    /// is dropped.
    pub fn spawn(
        cfg: EngineConfig,
    ) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let (state_tx, state_rx) = watch::channel(EngineState::Loading);
        let context_tokens = cfg.context_tokens;
        let capacity = cfg.queue_capacity;
        let join = std::thread::Builder::new()
            .name("tagllm-engine".into())
            .spawn(move || run(cfg, rx, state_tx))?;
        Ok((
            EngineHandle {
                tx,
                state: state_rx,
                capacity,
                context_tokens,
            },
            join,
        ))
    }

    /// The current state.
    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn watch(&self) -> watch::Receiver<EngineState> {
        self.state.clone()
    }

    /// Waits until the engine is ready (or failed).
    pub async fn wait_ready(&self) -> Result<Arc<ModelInfo>, String> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                EngineState::Ready(info) => return Ok(info.clone()),
                EngineState::Failed(e) => return Err(e.clone()),
                EngineState::Loading => {}
            }
            if rx.changed().await.is_err() {
                return Err("engine stopped".into());
            }
        }
    }

    /// Model info when ready.
    pub fn info(&self) -> Result<Arc<ModelInfo>, SubmitError> {
        match &*self.state.borrow() {
            EngineState::Ready(info) => Ok(info.clone()),
            EngineState::Loading => Err(SubmitError::NotReady("loading".into())),
            EngineState::Failed(e) => Err(SubmitError::NotReady(e.clone())),
        }
    }

    /// Jobs waiting now.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Context length jobs run with.
    pub fn context_tokens(&self) -> usize {
        self.context_tokens
    }

    /// Queues a job without waiting; refuses when the queue is full or the model is not ready.
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        self.info()?;
        let sent = self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!("tagllm_engine_jobs_total", "outcome" => "refused_full")
                    .increment(1);
                SubmitError::QueueFull(self.capacity)
            }
            mpsc::error::TrySendError::Closed(_) => SubmitError::NotReady("engine stopped".into()),
        });
        metrics::gauge!("tagllm_engine_queue_depth").set(self.queue_depth() as f64);
        sent
    }
}

fn run(cfg: EngineConfig, mut rx: mpsc::Receiver<Job>, state: watch::Sender<EngineState>) {
    let t0 = Instant::now();
    let device = match super::parse_device(&cfg.device) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "no device");
            state.send_replace(EngineState::Failed(e));
            return;
        }
    };
    let opts = LoadOptions {
        requantize: cfg.requantize,
        context_tokens: cfg.context_tokens,
        device,
        dtype: cfg.dtype,
        image_max_pixels: cfg.image_max_pixels,
    };
    let mut model = match TextModel::load_with(&cfg.model_path, &opts) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "model failed to load");
            state.send_replace(EngineState::Failed(e.to_string()));
            return;
        }
    };
    // Warm-up: one short generation, so the first request pays no first-touch costs.
    let warm = model
        .encode_chat(&[Message::new("user", "Hi")], "")
        .and_then(|p| {
            let params = GenParams {
                max_new_tokens: 2,
                context_tokens: cfg.context_tokens,
                assistant_prefix: String::new(),
                stop_at_json_end: false,
                grammar: None,
            };
            model.generate(&p, &params, &|| false)
        });
    if let Err(e) = warm {
        tracing::error!(error = %e, "model warm-up failed");
        state.send_replace(EngineState::Failed(format!("warm-up: {e}")));
        return;
    }
    let info = Arc::new(model.info.clone());
    tracing::info!(
        model = %info.version,
        load_ms = t0.elapsed().as_millis() as u64,
        "model loaded and warm"
    );
    state.send_replace(EngineState::Ready(info));
    while let Some(job) = rx.blocking_recv() {
        metrics::gauge!("tagllm_engine_queue_depth").set(rx.len() as f64);
        if job.reply.is_closed() {
            metrics::counter!("tagllm_engine_jobs_total", "outcome" => "cancelled").increment(1);
            continue; // the caller left while queued
        }
        // One sequence per step until continuous batching lands; the series is there already.
        metrics::histogram!("tagllm_engine_batch_size").record(1.0);
        let queue = job.enqueued.elapsed();
        let reply = &job.reply;
        let room = cfg
            .context_tokens
            .saturating_sub(job.max_new_tokens)
            .saturating_sub(model.extra_image_tokens(&job.images));
        let result = model
            .encode_chat_within(&job.messages, &job.assistant_prefix, room)
            .and_then(|(prompt, truncated)| {
                let params = GenParams {
                    max_new_tokens: job.max_new_tokens,
                    context_tokens: cfg.context_tokens,
                    assistant_prefix: job.assistant_prefix.clone(),
                    stop_at_json_end: true,
                    grammar: job.grammar.clone(),
                };
                model
                    .generate_with_images(&prompt, &job.images, &params, &|| reply.is_closed())
                    .map(|generation| JobOutput {
                        generation,
                        queue,
                        truncated,
                    })
            });
        let outcome = match &result {
            Ok(out) => {
                let g = &out.generation;
                crate::metrics::record_generation(
                    out.queue,
                    g.prefill_ms,
                    g.decode_ms,
                    g.prompt_tokens,
                    g.generated_tokens,
                );
                "ok"
            }
            Err(ModelError::Cancelled) => "cancelled",
            Err(_) => "error",
        };
        metrics::counter!("tagllm_engine_jobs_total", "outcome" => outcome).increment(1);
        let _ = job.reply.send(result);
    }
    state.send_replace(EngineState::Failed("engine stopped".into()));
}
