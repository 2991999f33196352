//! The engine: one OS thread owns the model and serves generation jobs from a bounded queue, so
//! candle never runs on a Tokio worker and a full queue sheds load (`try_send`) instead of piling
//! up. The thread loads and warms the model first; [`EngineHandle::state`] says when it is ready.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    chat::Message, qwen3vl::image_proc::ProcessedImage, scheduler::Scheduler, GenParams,
    Generation, LoadOptions, ModelError, ModelInfo, PromptInput, Requantize, TextModel,
};

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
    /// Sequences decoded together (models that batch).
    pub max_batch: usize,
    /// Prompt tokens prefilled in one step (at least one prompt is always admitted).
    pub max_batch_tokens: usize,
    /// States after shared prompt prefixes kept (llama-family GGUF models; 0 disables).
    pub prefix_cache_entries: usize,
    /// Waiting jobs before `try_submit` refuses.
    pub queue_capacity: usize,
    /// Prompt + generation limit.
    pub context_tokens: usize,
    /// LoRA adapter merged at load.
    pub adapter: Option<PathBuf>,
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

impl Job {
    /// How to generate its answer, in a context of `context_tokens`.
    pub fn params(&self, context_tokens: usize) -> GenParams {
        GenParams {
            max_new_tokens: self.max_new_tokens,
            context_tokens,
            assistant_prefix: self.assistant_prefix.clone(),
            stop_at_json_end: true,
            grammar: self.grammar.clone(),
            shared_prefix: 0,
        }
    }
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
    #[error("the tagging queue is full ({waiting} jobs waiting)")]
    QueueFull {
        /// Jobs waiting.
        waiting: usize,
        /// About when a place should free up: the recent time per job times the jobs ahead,
        /// over the sequences decoded together.
        retry_after_ms: u64,
    },
    /// Not ready (loading, failed, or stopped).
    #[error("the model is not ready: {0}")]
    NotReady(String),
}

/// Counters the engine thread keeps, readable from any thread (tests and health checks).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences being decoded now.
    pub running: AtomicUsize,
    /// Most sequences ever decoded in one step.
    pub peak_batch: AtomicUsize,
    /// Jobs finished with a result.
    pub completed: AtomicU64,
    /// Jobs dropped because their caller went away (queued or mid-generation).
    pub cancelled: AtomicU64,
    /// Moving average of a job's prefill + decode time (ms; 0 before the first job).
    pub job_ms: AtomicU64,
    /// Sequences the loaded model decodes together.
    pub slots: AtomicUsize,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    stats: Arc<EngineStats>,
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
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        let join = std::thread::Builder::new()
            .name("tagllm-engine".into())
            .spawn(move || run(cfg, rx, state_tx, thread_stats))?;
        Ok((
            EngineHandle {
                tx,
                stats,
                state: state_rx,
                capacity,
                context_tokens,
            },
            join,
        ))
    }

    /// The engine's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
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

    /// Milliseconds after which a refused caller may find room: the recent time per job times
    /// the jobs ahead of it, over the sequences decoded together; between 50 ms and 60 s.
    pub fn retry_hint_ms(&self) -> u64 {
        let per_job = self.stats.job_ms.load(Ordering::Relaxed).max(100);
        let ahead = self.queue_depth() as u64 + 1;
        let slots = self.stats.slots.load(Ordering::Relaxed).max(1) as u64;
        (per_job * ahead / slots).clamp(50, 60_000)
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
                SubmitError::QueueFull {
                    waiting: self.capacity,
                    retry_after_ms: self.retry_hint_ms(),
                }
            }
            mpsc::error::TrySendError::Closed(_) => SubmitError::NotReady("engine stopped".into()),
        });
        metrics::gauge!("tagllm_engine_queue_depth").set(self.queue_depth() as f64);
        sent
    }
}

fn run(
    cfg: EngineConfig,
    mut rx: mpsc::Receiver<Job>,
    state: watch::Sender<EngineState>,
    stats: Arc<EngineStats>,
) {
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
        max_batch: cfg.max_batch,
        prefix_cache: cfg.prefix_cache_entries,
        adapter: cfg.adapter.clone(),
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
            // Through the batch path (slot 0), the one the engine serves with: no second cache
            // for the single-sequence path.
            let first = model
                .prefill_batch(&[PromptInput {
                    ids: &p,
                    images: &[],
                    slot: 0,
                    shared_prefix: 0,
                }])?
                .remove(0);
            model
                .decode_batch(&[(super::argmax(&first.logits), 0)])
                .map(|_| ())
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
        device = %info.device,
        // Which Q8_0 matmul CPU projections run on (`TAGLLM_KERNELS` can ask for less).
        cpu_kernels = match (info.device.as_str(), tagllm_kernels::isa()) {
            ("cpu", Some(tagllm_kernels::Isa::Avx512Vnni)) => "avx512-vnni",
            ("cpu", Some(tagllm_kernels::Isa::Avx2)) => "avx2",
            ("cpu", None) => "candle",
            _ => "none",
        },
        "model loaded and warm"
    );
    state.send_replace(EngineState::Ready(info));
    stats.slots.store(model.max_batch(), Ordering::Relaxed);
    Scheduler::new(model.max_batch(), cfg.max_batch_tokens, cfg.context_tokens)
        .run(&mut model, &mut rx, &stats);
    state.send_replace(EngineState::Failed("engine stopped".into()));
}

/// Counts a finished job and sends its result.
pub(super) fn reply(job: Job, result: Result<JobOutput, ModelError>, stats: &EngineStats) {
    match &result {
        Err(ModelError::Cancelled) => {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(out) => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
            let ms = (out.generation.prefill_ms + out.generation.decode_ms) as u64;
            let old = stats.job_ms.load(Ordering::Relaxed);
            let new = if old == 0 { ms } else { (old * 4 + ms) / 5 };
            stats.job_ms.store(new, Ordering::Relaxed);
        }
        Err(_) => {
            stats.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let outcome = match &result {
        Ok(out) => {
            let g = &out.generation;
            crate::metrics::record_generation(
                out.queue,
                g.prefill_ms,
                g.decode_ms,
                g.prompt_tokens,
                g.cached_prompt_tokens,
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
