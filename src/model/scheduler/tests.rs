//! The scheduler's rules on a fake model: it answers each prompt with the prompt reversed,
//! one character per token, keeping its state per cache slot, so a job answered from another
//! job's slot, or fed another job's token, gives a wrong answer or fails an assertion.

use std::collections::{HashSet, VecDeque};

use tokio::sync::oneshot;

use super::*;
use crate::model::{argmax, chat::Message};

const VOCAB: usize = 128;

fn one_hot(token: u32) -> Vec<f32> {
    let mut l = vec![0.0; VOCAB];
    l[token as usize] = 1.0;
    l
}

#[derive(Default)]
struct Fake {
    /// Per slot: the prompt it holds and the tokens fed back since its prefill.
    state: Vec<Option<(Vec<u32>, usize)>>,
    /// Each prefill call: per prompt, its text and the tokens computed for it.
    prefills: Vec<Vec<(String, usize)>>,
    /// Each decode call: the slots it stepped.
    decodes: Vec<Vec<usize>>,
    /// Heads whose state the fake prefix cache holds.
    cached: HashSet<Vec<u32>>,
}

struct FakeSeq {
    out: Vec<u32>,
    max_new: usize,
    prompt_tokens: usize,
}

impl Fake {
    fn new(slots: usize) -> Fake {
        Fake {
            state: vec![None; slots],
            ..Fake::default()
        }
    }

    /// The logits after `fed` tokens of the answer to `prompt`: its next character from the
    /// end, or 0 (the stop token) when it is used up.
    fn next(prompt: &[u32], fed: usize) -> Vec<f32> {
        one_hot(prompt.len().checked_sub(fed + 1).map_or(0, |i| prompt[i]))
    }
}

impl BatchModel for Fake {
    type Seq = FakeSeq;

    fn slots(&self) -> usize {
        self.state.len()
    }

    fn encode(&self, job: &Job, context_tokens: usize) -> Result<EncodedJob, ModelError> {
        let m = &job.messages[0];
        let ids: Vec<u32> = m.content.chars().map(|c| c as u32).collect();
        let limit = context_tokens - job.max_new_tokens;
        if ids.len() > limit {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                limit,
            });
        }
        Ok(EncodedJob {
            cost: ids.len(),
            shared_prefix: m.shared_head,
            ids,
            truncated: false,
        })
    }

    fn prefix_cached(&self, head: &[u32]) -> bool {
        self.cached.contains(head)
    }

    fn prefill(&mut self, prompts: &[PromptInput<'_>]) -> Result<Vec<Prefilled>, ModelError> {
        let slots: HashSet<usize> = prompts.iter().map(|p| p.slot).collect();
        assert_eq!(slots.len(), prompts.len(), "two prompts in one slot");
        let text = |ids: &[u32]| ids.iter().map(|&t| char::from(t as u8)).collect::<String>();
        if prompts.iter().any(|p| text(p.ids).contains('!')) {
            return Err(ModelError::Runtime("the fake fails on '!'".into()));
        }
        let mut call = Vec::new();
        let mut out = Vec::new();
        for p in prompts {
            let head = &p.ids[..p.shared_prefix];
            let chunked = prefix::is_chunk(p.shared_prefix, p.ids.len());
            let hit = chunked && !self.cached.insert(head.to_vec());
            let computed = p.ids.len() - if hit { p.shared_prefix } else { 0 };
            call.push((text(p.ids), computed));
            self.state[p.slot] = Some((p.ids.to_vec(), 0));
            out.push(Prefilled {
                logits: Fake::next(p.ids, 0),
                tokens: p.ids.len(),
                cached: p.ids.len() - computed,
            });
        }
        self.prefills.push(call);
        Ok(out)
    }

    fn start(
        &mut self,
        params: &GenParams,
        prefilled: &Prefilled,
        _prefill_ms: f64,
    ) -> Result<FakeSeq, ModelError> {
        Ok(FakeSeq {
            out: Vec::new(),
            max_new: params.max_new_tokens,
            prompt_tokens: prefilled.tokens,
        })
    }

    fn advance(&self, seq: &mut FakeSeq, logits: &[f32]) -> Result<Option<u32>, ModelError> {
        let next = argmax(logits);
        if next == 0 {
            return Ok(None);
        }
        seq.out.push(next);
        Ok((seq.out.len() < seq.max_new).then_some(next))
    }

    fn finish(&self, seq: FakeSeq) -> Result<Generation, ModelError> {
        Ok(Generation {
            text: seq.out.iter().map(|&t| char::from(t as u8)).collect(),
            prompt_tokens: seq.prompt_tokens,
            generated_tokens: seq.out.len(),
            ..Generation::default()
        })
    }

    fn decode(&mut self, steps: &[(u32, usize)]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.decodes.push(steps.iter().map(|s| s.1).collect());
        let mut out = Vec::new();
        for &(token, slot) in steps {
            let (prompt, fed) = self.state[slot].as_mut().expect("a prefilled slot");
            assert_eq!(
                token,
                prompt[prompt.len() - 1 - *fed],
                "slot {slot} was fed another sequence's token"
            );
            *fed += 1;
            out.push(Fake::next(prompt, *fed));
        }
        Ok(out)
    }
}

/// A test's queue: its jobs, then closed (or empty, when `closed` is false).
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl JobSource for Queue {
    fn next(&mut self, _wait: bool) -> Next {
        match self.jobs.pop_front() {
            Some(job) => Next::Job(job),
            None if self.closed => Next::Closed,
            None => Next::Empty,
        }
    }

    fn waiting(&self) -> usize {
        self.jobs.len()
    }
}

type Reply = oneshot::Receiver<Result<JobOutput, ModelError>>;

fn job(message: Message, max_new_tokens: usize) -> (Job, Reply) {
    let (tx, rx) = oneshot::channel();
    let job = Job {
        messages: vec![message],
        images: Vec::new(),
        max_new_tokens,
        assistant_prefix: String::new(),
        grammar: None,
        enqueued: Instant::now(),
        reply: tx,
    };
    (job, rx)
}

/// Jobs for `texts`, each answering up to `max_new` tokens, in a closed queue.
fn queue(texts: &[&str], max_new: usize) -> (Queue, Vec<Reply>) {
    let (jobs, replies) = texts
        .iter()
        .map(|t| job(Message::new("user", *t), max_new))
        .unzip();
    let q = Queue { jobs, closed: true };
    (q, replies)
}

fn answer(rx: &mut Reply) -> Result<String, String> {
    match rx.try_recv().expect("answered") {
        Ok(out) => Ok(out.generation.text),
        Err(e) => Err(e.to_string()),
    }
}

fn reversed(s: &str, n: usize) -> String {
    s.chars().rev().take(n).collect()
}

fn texts(call: &[(String, usize)]) -> Vec<&str> {
    call.iter().map(|(t, _)| t.as_str()).collect()
}

#[test]
fn every_job_gets_its_own_answer_within_the_slots() {
    let prompts = ["abc", "hello", "xy", "tagllm", "q"];
    let (mut q, mut replies) = queue(&prompts, 4);
    let mut fake = Fake::new(2);
    let stats = EngineStats::default();
    Scheduler::new(2, 1000, 100).run(&mut fake, &mut q, &stats);
    for (p, rx) in prompts.iter().zip(&mut replies) {
        assert_eq!(answer(rx), Ok(reversed(p, 4)), "{p}");
    }
    assert!(fake.decodes.iter().all(|d| d.len() <= 2));
    assert_eq!(stats.peak_batch.load(Ordering::Relaxed), 2);
    assert_eq!(stats.completed.load(Ordering::Relaxed), 5);
    assert_eq!(stats.running.load(Ordering::Relaxed), 0);
}

#[test]
fn the_prefill_budget_holds_and_nobody_overtakes() {
    // Budget 8: "aaaaa" (5) leaves 3, so "bbbbb" (5) waits, and "ccc" (3), which would fit,
    // does not overtake it; next step "bbbbb" + "ccc" fill the budget; "dddddddddd" (10) is
    // over any budget and runs alone.
    let prompts = ["aaaaa", "bbbbb", "ccc", "dddddddddd"];
    let (mut q, mut replies) = queue(&prompts, 5);
    let mut fake = Fake::new(4);
    let stats = EngineStats::default();
    Scheduler::new(4, 8, 100).run(&mut fake, &mut q, &stats);
    let calls: Vec<Vec<&str>> = fake.prefills.iter().map(|c| texts(c)).collect();
    assert_eq!(
        calls,
        vec![vec!["aaaaa"], vec!["bbbbb", "ccc"], vec!["dddddddddd"]]
    );
    for call in &fake.prefills {
        let computed: usize = call.iter().map(|c| c.1).sum();
        assert!(computed <= 8 || call.len() == 1, "{call:?}");
    }
    for (p, rx) in prompts.iter().zip(&mut replies) {
        assert_eq!(answer(rx), Ok(reversed(p, 5)));
    }
}

#[test]
fn a_shared_prefix_computed_once_is_free_in_the_budget() {
    let head = "h".repeat(prefix::PrefixCache::<()>::MIN_TOKENS);
    let note =
        |tail: &str| Message::new("user", format!("{head}{tail}")).with_shared_head(head.len());
    // Budget: one full prompt plus two tails. The second prompt's head is computed by the
    // first in the same step, so it costs its tail only and joins the first step; the third
    // comes later and finds the head in the prefix cache.
    let budget = head.len() + 4;
    let (a, mut ra) = job(note("ab"), 2);
    let (b, mut rb) = job(note("cd"), 2);
    let mut q = Queue {
        jobs: VecDeque::from([a, b]),
        closed: false,
    };
    let mut fake = Fake::new(4);
    let stats = EngineStats::default();
    let mut s = Scheduler::new(4, budget, 1000);
    s.step(&mut fake, &mut q, &stats);
    assert_eq!(fake.prefills.len(), 1);
    let computed: Vec<usize> = fake.prefills[0].iter().map(|c| c.1).collect();
    assert_eq!(computed, vec![head.len() + 2, 2]);
    let (c, mut rc) = job(note("ef"), 2);
    q.jobs.push_back(c);
    q.closed = true;
    s.run(&mut fake, &mut q, &stats);
    assert_eq!(fake.prefills[1], vec![(format!("{head}ef"), 2)]);
    assert_eq!(answer(&mut ra), Ok("ba".into()));
    assert_eq!(answer(&mut rb), Ok("dc".into()));
    assert_eq!(answer(&mut rc), Ok("fe".into()));

    // The same prompts with a head too short to be a chunk of its own: nothing is shared,
    // so the second waits for the next step.
    let short = |tail: &str| Message::new("user", format!("hhhh{tail}")).with_shared_head(4);
    let (a, _ra) = job(short("ab"), 2);
    let (b, _rb) = job(short("cd"), 2);
    let mut q = Queue {
        jobs: VecDeque::from([a, b]),
        closed: true,
    };
    let mut fake = Fake::new(4);
    Scheduler::new(4, 8, 1000).run(&mut fake, &mut q, &stats);
    let calls: Vec<Vec<&str>> = fake.prefills.iter().map(|c| texts(c)).collect();
    assert_eq!(calls, vec![vec!["hhhhab"], vec!["hhhhcd"]]);
}

#[test]
fn a_caller_that_leaves_frees_its_slot() {
    let long = "z".repeat(60);
    let (a, ra) = job(Message::new("user", long.as_str()), 50);
    let (b, rb) = job(Message::new("user", "gone"), 4);
    let (c, mut rc) = job(Message::new("user", "next"), 4);
    drop(rb); // left while queued: never prefilled
    let mut q = Queue {
        jobs: VecDeque::from([a, b, c]),
        closed: true,
    };
    let mut fake = Fake::new(1);
    let stats = EngineStats::default();
    let mut s = Scheduler::new(1, 1000, 1000);
    s.step(&mut fake, &mut q, &stats);
    assert_eq!(s.running(), 1);
    drop(ra); // left mid-generation: dropped before the next decode step
    s.run(&mut fake, &mut q, &stats);
    assert_eq!(answer(&mut rc), Ok("txen".into()));
    let calls: Vec<Vec<&str>> = fake.prefills.iter().map(|c| texts(c)).collect();
    assert_eq!(calls, vec![vec![long.as_str()], vec!["next"]]);
    // One decode step for the long job, then only "next"'s three.
    assert_eq!(fake.decodes.len(), 1 + 3);
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), 2);
    assert_eq!(stats.completed.load(Ordering::Relaxed), 1);
}

#[test]
fn failures_stay_with_their_jobs() {
    // Budget 1: every prompt is prefilled alone.
    let too_long = "l".repeat(200);
    let prompts = ["ok1", "bad!", too_long.as_str(), "ok2"];
    let (mut q, mut replies) = queue(&prompts, 3);
    let mut fake = Fake::new(1);
    let stats = EngineStats::default();
    Scheduler::new(1, 1, 100).run(&mut fake, &mut q, &stats);
    assert_eq!(answer(&mut replies[0]), Ok("1ko".into()));
    let bad = answer(&mut replies[1]).unwrap_err();
    assert!(bad.contains("fails on '!'"), "{bad}");
    let long = answer(&mut replies[2]).unwrap_err();
    assert!(long.contains("200 tokens"), "{long}");
    assert_eq!(answer(&mut replies[3]), Ok("2ko".into()));
    assert_eq!(stats.completed.load(Ordering::Relaxed), 4);
    let calls: Vec<Vec<&str>> = fake.prefills.iter().map(|c| texts(c)).collect();
    assert_eq!(calls, vec![vec!["ok1"], vec!["ok2"]]);
}
