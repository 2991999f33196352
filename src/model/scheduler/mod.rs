//! Continuous batching, as a struct with three steps the engine thread repeats: **admit** waiting
//! jobs while there are free cache slots and prefill budget, **prefill** the newcomers together,
//! and **decode** one token for every running sequence. Between steps finished sequences leave
//! and a sequence whose caller went away is dropped, freeing its slot.
//!
//! The rules, each tested below on a fake model (the way TGI tests its queue):
//! - **slots**: at most one sequence per cache slot; each keeps its own KV cache, so a job's
//!   tokens do not depend on what it was batched with.
//! - **token budget**: the prompts prefilled in one step compute at most `max_batch_tokens`
//!   tokens, counting a shared prefix as free when the prefix cache holds it or a newcomer of the
//!   same step computes it; a prompt over the budget still runs, alone.
//! - **first come, first served**: jobs are admitted in arrival order; one that does not fit the
//!   step's budget is the first admitted in the next step, never overtaken by a smaller one.
//! - **cancellation**: a job whose caller left is never prefilled; a running one is dropped
//!   before the next decode step.
//! - **failure stays local**: a job that cannot be encoded is answered at once; a failed prefill
//!   or decode fails the sequences in it and frees their slots; the scheduler keeps serving.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    batch::{Prefilled, PromptInput},
    engine::{reply, EngineStats, Job, JobOutput},
    prefix, GenParams, Generation, ModelError, Sequence, TextModel,
};

/// A job's prompt, encoded by the model.
#[derive(Debug, Clone)]
pub struct EncodedJob {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Leading ids that other prompts share ([`super::EncodedPrompt::shared_prefix`]).
    pub shared_prefix: usize,
    /// Whether the note's end was cut to fit the context.
    pub truncated: bool,
    /// Prompt tokens to compute, image tokens included, before any prefix reuse.
    pub cost: usize,
}

/// What the scheduler needs of a model: [`TextModel`] in the server, a fake in the tests.
pub trait BatchModel {
    /// One sequence's generation state.
    type Seq;
    /// Cache slots: sequences decoded together.
    fn slots(&self) -> usize;
    /// Encodes a job's prompt to fit `context_tokens` with its generation.
    fn encode(&self, job: &Job, context_tokens: usize) -> Result<EncodedJob, ModelError>;
    /// Whether the state after exactly `head` is in the prefix cache.
    fn prefix_cached(&self, head: &[u32]) -> bool;
    /// Prefills prompts into their free slots.
    fn prefill(&mut self, prompts: &[PromptInput<'_>]) -> Result<Vec<Prefilled>, ModelError>;
    /// A new sequence after its prefill.
    fn start(
        &mut self,
        params: &GenParams,
        prefilled: &Prefilled,
        prefill_ms: f64,
    ) -> Result<Self::Seq, ModelError>;
    /// The next token to feed back, or `None` when the sequence is finished.
    fn advance(&self, seq: &mut Self::Seq, logits: &[f32]) -> Result<Option<u32>, ModelError>;
    /// The finished sequence's generation.
    fn finish(&self, seq: Self::Seq) -> Result<Generation, ModelError>;
    /// One decode step: `(token, slot)` each; each sequence's next-token logits.
    fn decode(&mut self, steps: &[(u32, usize)]) -> Result<Vec<Vec<f32>>, ModelError>;
}

impl BatchModel for TextModel {
    type Seq = Sequence;

    fn slots(&self) -> usize {
        self.max_batch()
    }

    fn encode(&self, job: &Job, context_tokens: usize) -> Result<EncodedJob, ModelError> {
        let images = self.extra_image_tokens(&job.images);
        let room = context_tokens
            .saturating_sub(job.max_new_tokens)
            .saturating_sub(images);
        let p = self.encode_chat_within(&job.messages, &job.assistant_prefix, room)?;
        Ok(EncodedJob {
            cost: p.ids.len() + images,
            ids: p.ids,
            shared_prefix: p.shared_prefix,
            truncated: p.truncated,
        })
    }

    fn prefix_cached(&self, head: &[u32]) -> bool {
        TextModel::prefix_cached(self, head)
    }

    fn prefill(&mut self, prompts: &[PromptInput<'_>]) -> Result<Vec<Prefilled>, ModelError> {
        self.prefill_batch(prompts)
    }

    fn start(
        &mut self,
        params: &GenParams,
        prefilled: &Prefilled,
        prefill_ms: f64,
    ) -> Result<Sequence, ModelError> {
        let mut seq = self.start_sequence(params, prefilled.tokens)?;
        seq.prefill_ms = prefill_ms;
        seq.cached_prompt_tokens = prefilled.cached;
        seq.start_decode_clock();
        Ok(seq)
    }

    fn advance(&self, seq: &mut Sequence, logits: &[f32]) -> Result<Option<u32>, ModelError> {
        TextModel::advance(self, seq, logits)
    }

    fn finish(&self, seq: Sequence) -> Result<Generation, ModelError> {
        TextModel::finish(self, seq)
    }

    fn decode(&mut self, steps: &[(u32, usize)]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.decode_batch(steps)
    }
}

/// The next job from the queue.
pub enum Next {
    /// A job.
    Job(Job),
    /// None waiting now.
    Empty,
    /// The queue is closed and drained: every handle is gone.
    Closed,
}

/// Where jobs come from: the engine's bounded channel, or a test's list.
pub trait JobSource {
    /// The next job; with `wait`, blocks until one comes or the queue closes.
    fn next(&mut self, wait: bool) -> Next;
    /// Jobs waiting now.
    fn waiting(&self) -> usize;
}

impl JobSource for mpsc::Receiver<Job> {
    fn next(&mut self, wait: bool) -> Next {
        if wait {
            return self.blocking_recv().map_or(Next::Closed, Next::Job);
        }
        match self.try_recv() {
            Ok(job) => Next::Job(job),
            Err(mpsc::error::TryRecvError::Empty) => Next::Empty,
            Err(mpsc::error::TryRecvError::Disconnected) => Next::Closed,
        }
    }

    fn waiting(&self) -> usize {
        self.len()
    }
}

/// A job whose prompt is encoded, waiting for a slot and prefill budget.
struct Admitted {
    job: Job,
    prompt: EncodedJob,
    queue: Duration,
}

impl Admitted {
    fn head(&self) -> &[u32] {
        &self.prompt.ids[..self.prompt.shared_prefix]
    }

    /// Whether its shared prefix is a chunk of its own (the prefix cache's rule).
    fn chunked(&self) -> bool {
        prefix::is_chunk(self.prompt.shared_prefix, self.prompt.ids.len())
    }

    fn output(&self, generation: Generation) -> JobOutput {
        JobOutput {
            generation,
            queue: self.queue,
            truncated: self.prompt.truncated,
        }
    }
}

/// A job being decoded.
struct Running<S> {
    admitted: Admitted,
    seq: S,
    slot: usize,
    next: u32,
}

/// Continuous batching over a model's cache slots (see the module doc for the rules).
pub struct Scheduler<S> {
    max_batch_tokens: usize,
    context_tokens: usize,
    free: Vec<usize>,
    running: Vec<Running<S>>,
    /// The head of the line: encoded, but over the last step's budget.
    waiting: Option<Admitted>,
    open: bool,
}

impl<S> Scheduler<S> {
    /// A scheduler over `slots` cache slots that prefills at most `max_batch_tokens` prompt
    /// tokens per step, for jobs that run with `context_tokens` of context.
    pub fn new(slots: usize, max_batch_tokens: usize, context_tokens: usize) -> Scheduler<S> {
        Scheduler {
            max_batch_tokens,
            context_tokens,
            free: (0..slots.max(1)).rev().collect(),
            running: Vec::new(),
            waiting: None,
            open: true,
        }
    }

    /// Sequences being decoded.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Runs until the queue is closed and every job is answered.
    pub fn run<M: BatchModel<Seq = S>>(
        &mut self,
        model: &mut M,
        source: &mut impl JobSource,
        stats: &EngineStats,
    ) {
        while self.step(model, source, stats) {}
    }

    /// One iteration: admit, prefill the newcomers, one decode step. `false` once the queue is
    /// closed and nothing is left to do.
    pub fn step<M: BatchModel<Seq = S>>(
        &mut self,
        model: &mut M,
        source: &mut impl JobSource,
        stats: &EngineStats,
    ) -> bool {
        let batch = self.admit(model, source, stats);
        if batch.is_empty() && self.running.is_empty() {
            return self.open || self.waiting.is_some();
        }
        self.prefill(model, batch, stats);
        self.decode(model, stats);
        true
    }

    /// Takes jobs in arrival order while there are free slots and prefill budget; each gets its
    /// slot. Waits for a job only when nothing else is running.
    fn admit<M: BatchModel<Seq = S>>(
        &mut self,
        model: &M,
        source: &mut impl JobSource,
        stats: &EngineStats,
    ) -> Vec<(Admitted, usize)> {
        let mut batch: Vec<(Admitted, usize)> = Vec::new();
        let mut budget = self.max_batch_tokens;
        while !self.free.is_empty() {
            let next = match self.waiting.take() {
                Some(a) => a,
                None => {
                    let wait = self.running.is_empty() && batch.is_empty() && self.open;
                    let job = match source.next(wait) {
                        Next::Job(job) => job,
                        Next::Empty => break,
                        Next::Closed => {
                            self.open = false;
                            break;
                        }
                    };
                    metrics::gauge!("tagllm_engine_queue_depth").set(source.waiting() as f64);
                    if job.reply.is_closed() {
                        cancelled_while_queued(stats);
                        continue;
                    }
                    let queue = job.enqueued.elapsed();
                    match model.encode(&job, self.context_tokens) {
                        Ok(prompt) => Admitted { job, prompt, queue },
                        Err(e) => {
                            reply(job, Err(e), stats);
                            continue;
                        }
                    }
                }
            };
            // Tokens this prompt will actually compute: its shared prefix is free when the
            // prefix cache holds it or a newcomer of this step computes it.
            let reused = next.chunked()
                && (model.prefix_cached(next.head())
                    || batch
                        .iter()
                        .any(|(a, _)| a.chunked() && a.head() == next.head()));
            let cost = next.prompt.cost - if reused { next.prompt.shared_prefix } else { 0 };
            if !batch.is_empty() && cost > budget {
                self.waiting = Some(next);
                break;
            }
            budget = budget.saturating_sub(cost);
            let slot = self.free.pop().expect("a free slot");
            batch.push((next, slot));
        }
        batch
    }

    /// Prefills the newcomers together and starts their sequences (a sequence may finish on
    /// its first token).
    fn prefill<M: BatchModel<Seq = S>>(
        &mut self,
        model: &mut M,
        batch: Vec<(Admitted, usize)>,
        stats: &EngineStats,
    ) {
        if batch.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let inputs: Vec<PromptInput<'_>> = batch
            .iter()
            .map(|(a, slot)| PromptInput {
                ids: &a.prompt.ids,
                images: &a.job.images,
                slot: *slot,
                shared_prefix: a.prompt.shared_prefix,
            })
            .collect();
        let prefilled = model.prefill(&inputs);
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let outs = match prefilled {
            Ok(outs) => outs,
            Err(e) => {
                let msg = e.to_string();
                for (a, slot) in batch {
                    self.free.push(slot);
                    reply(a.job, Err(ModelError::Runtime(msg.clone())), stats);
                }
                return;
            }
        };
        for ((a, slot), p) in batch.into_iter().zip(outs) {
            let params = a.job.params(self.context_tokens);
            let started = model.start(&params, &p, prefill_ms);
            let mut seq = match started {
                Ok(s) => s,
                Err(e) => {
                    self.free.push(slot);
                    reply(a.job, Err(e), stats);
                    continue;
                }
            };
            match model.advance(&mut seq, &p.logits) {
                Ok(Some(next)) => self.running.push(Running {
                    admitted: a,
                    seq,
                    slot,
                    next,
                }),
                Ok(None) => {
                    self.free.push(slot);
                    let out = model.finish(seq).map(|g| a.output(g));
                    reply(a.job, out, stats);
                }
                Err(e) => {
                    self.free.push(slot);
                    reply(a.job, Err(e), stats);
                }
            }
        }
    }

    /// Drops sequences whose caller left, then decodes one token for the rest; finished ones
    /// are answered and free their slots.
    fn decode<M: BatchModel<Seq = S>>(&mut self, model: &mut M, stats: &EngineStats) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].admitted.job.reply.is_closed() {
                let r = self.running.swap_remove(i);
                self.free.push(r.slot);
                reply(r.admitted.job, Err(ModelError::Cancelled), stats);
            } else {
                i += 1;
            }
        }
        stats.running.store(self.running.len(), Ordering::Relaxed);
        if self.running.is_empty() {
            return;
        }
        metrics::histogram!("tagllm_engine_batch_size").record(self.running.len() as f64);
        stats
            .peak_batch
            .fetch_max(self.running.len(), Ordering::Relaxed);
        let steps: Vec<(u32, usize)> = self.running.iter().map(|r| (r.next, r.slot)).collect();
        let all = match model.decode(&steps) {
            Ok(all) => all,
            Err(e) => {
                let msg = e.to_string();
                for r in self.running.drain(..) {
                    self.free.push(r.slot);
                    reply(r.admitted.job, Err(ModelError::Runtime(msg.clone())), stats);
                }
                stats.running.store(0, Ordering::Relaxed);
                return;
            }
        };
        let mut still = Vec::with_capacity(self.running.len());
        for (mut r, logits) in self.running.drain(..).zip(all) {
            match model.advance(&mut r.seq, &logits) {
                Ok(Some(next)) => {
                    r.next = next;
                    still.push(r);
                }
                Ok(None) => {
                    self.free.push(r.slot);
                    let out = model.finish(r.seq).map(|g| r.admitted.output(g));
                    reply(r.admitted.job, out, stats);
                }
                Err(e) => {
                    self.free.push(r.slot);
                    reply(r.admitted.job, Err(e), stats);
                }
            }
        }
        self.running = still;
        stats.running.store(self.running.len(), Ordering::Relaxed);
    }
}

/// Counts a job whose caller left before it was prefilled.
fn cancelled_while_queued(stats: &EngineStats) {
    stats.cancelled.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("tagllm_engine_jobs_total", "outcome" => "cancelled").increment(1);
}

#[cfg(test)]
mod tests;
