//! `tagllm backfill notes.jsonl`: streams a file of notes through a running server's `TagNotes`,
//! with a progress bar, retries for overload, a failure report, and resumption.
//!
//! Resumption: every note the server acknowledged (its response arrived, so it is durably
//! stored) is appended to a state file by id; a rerun skips those ids. The state file is a
//! convenience, not the source of truth: the server's TagNote is idempotent, so a note sent twice
//! (say, after a crash lost the last state lines) is answered from the store without generation.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    io::{BufRead, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};

use crate::grpc::pb;

/// What to backfill and how.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Notes, one JSON object per line.
    pub input: PathBuf,
    /// Server address (`host:port` or a URL).
    pub addr: String,
    /// Ids already acknowledged; appended to as responses arrive.
    pub state: PathBuf,
    /// Where failed notes are written (JSONL), rewritten each run.
    pub failures: PathBuf,
    /// Ignore the state file and send every note.
    pub restart: bool,
    /// Regenerate even when the stored result is current.
    pub force: bool,
    /// Notes in flight on the stream.
    pub window: usize,
    /// Retries of a note refused for overload (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`).
    pub retries: u32,
    /// Stop after sending this many new notes (0: all).
    pub limit: usize,
    /// Draw the progress bar (it also hides itself when stderr is not a terminal).
    pub progress: bool,
    /// TLS for an `https://` address.
    pub tls: crate::client::upstream::ClientTls,
}

/// The outcome of a run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BackfillSummary {
    /// Lines in the input (blank lines excluded).
    pub lines: usize,
    /// Skipped: acknowledged by an earlier run.
    pub skipped: usize,
    /// Tagged now (generated).
    pub tagged: usize,
    /// Answered from the store (content and versions unchanged).
    pub reused: usize,
    /// Failed, by gRPC code name or `InvalidJson`.
    pub failed: BTreeMap<String, usize>,
    /// Overload retries made.
    pub retried: usize,
    /// Left unsent because of `limit` or an interrupt.
    pub unsent: usize,
    /// Wall time (seconds).
    pub seconds: f64,
}

impl BackfillSummary {
    /// Failed notes in all.
    pub fn failed_total(&self) -> usize {
        self.failed.values().sum()
    }
}

impl std::fmt::Display for BackfillSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let done = self.tagged + self.reused;
        writeln!(
            f,
            "{} notes: {} tagged, {} reused, {} skipped (done before), {} failed, {} unsent; {} overload retries",
            self.lines,
            self.tagged,
            self.reused,
            self.skipped,
            self.failed_total(),
            self.unsent,
            self.retried
        )?;
        for (code, n) in &self.failed {
            writeln!(f, "  failed {code}: {n}")?;
        }
        write!(
            f,
            "{:.1} s, {:.2} notes/s",
            self.seconds,
            done as f64 / self.seconds.max(1e-9)
        )
    }
}

/// One input line, leniently: extra fields (authors, labels) are ignored; the server validates.
#[derive(Debug, Deserialize)]
struct LineNote {
    note_id: String,
    #[serde(default)]
    category: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    body: String,
    /// Image URIs.
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    updated_at_ms: i64,
}

impl LineNote {
    fn into_request(self, force: bool) -> pb::TagNoteRequest {
        pb::TagNoteRequest {
            note: Some(pb::Note {
                note_id: self.note_id,
                category: self.category,
                title: self.title,
                body: self.body,
                images: self
                    .images
                    .into_iter()
                    .map(|u| pb::Image {
                        source: Some(pb::image::Source::Uri(u)),
                    })
                    .collect(),
                updated_at_ms: self.updated_at_ms,
            }),
            force,
            include_raw_output: false,
        }
    }
}

/// The default state file beside the input: `notes.jsonl` -> `notes.jsonl.done`.
pub fn default_state(input: &Path) -> PathBuf {
    let mut s = input.as_os_str().to_owned();
    s.push(".done");
    PathBuf::from(s)
}

/// The default failure report beside the input: `notes.jsonl.failed`.
pub fn default_failures(input: &Path) -> PathBuf {
    let mut s = input.as_os_str().to_owned();
    s.push(".failed");
    PathBuf::from(s)
}

fn read_state(path: &Path) -> anyhow::Result<HashSet<String>> {
    match std::fs::File::open(path) {
        Ok(f) => {
            let mut done = HashSet::new();
            for line in std::io::BufReader::new(f).lines() {
                let line = line?;
                // A line cut by a crash is at worst a wrong id: that note is sent again, and
                // the server answers it from the store.
                if !line.is_empty() {
                    done.insert(line);
                }
            }
            Ok(done)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

/// A note on its way: where it came from and how often it was refused for overload.
struct Pending {
    line: usize,
    request: pb::TagNoteRequest,
    attempts: u32,
}

/// Runs a backfill; returns its summary (failed notes are in the summary and the failure file,
/// not an error). Errors: the input or state cannot be read, or the server cannot be reached
/// or breaks the stream (rerun to resume).
pub async fn run(
    opts: BackfillOptions,
    interrupt: impl std::future::Future<Output = ()>,
) -> anyhow::Result<BackfillSummary> {
    let t0 = Instant::now();
    let text = std::fs::read_to_string(&opts.input)
        .with_context(|| format!("reading {}", opts.input.display()))?;
    let done = if opts.restart {
        HashSet::new()
    } else {
        read_state(&opts.state)?
    };
    let mut summary = BackfillSummary::default();
    let mut failures = std::io::BufWriter::new(
        std::fs::File::create(&opts.failures)
            .with_context(|| format!("creating {}", opts.failures.display()))?,
    );
    let mut fail = |summary: &mut BackfillSummary,
                    line: usize,
                    note_id: &str,
                    code: String,
                    message: &str|
     -> anyhow::Result<()> {
        let rec =
            serde_json::json!({"line": line, "note_id": note_id, "code": code, "message": message});
        writeln!(failures, "{rec}")?;
        *summary.failed.entry(code).or_default() += 1;
        Ok(())
    };

    // Parse first: bad lines are reported without a round trip, and the bar knows its length.
    let mut queue: VecDeque<Pending> = VecDeque::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        summary.lines += 1;
        match serde_json::from_str::<LineNote>(line) {
            Ok(n) if done.contains(&n.note_id) => summary.skipped += 1,
            Ok(n) => queue.push_back(Pending {
                line: line_no,
                request: n.into_request(opts.force),
                attempts: 0,
            }),
            Err(e) => fail(
                &mut summary,
                line_no,
                "",
                "InvalidJson".into(),
                &e.to_string(),
            )?,
        }
    }
    if opts.limit > 0 && queue.len() > opts.limit {
        summary.unsent = queue.len() - opts.limit;
        queue.truncate(opts.limit);
    }

    let bar = if opts.progress {
        ProgressBar::new(summary.lines as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} notes ({per_sec}, eta {eta}) {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_position((summary.skipped + summary.failed_total()) as u64);

    let mut state = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&opts.state)
        .with_context(|| format!("opening {}", opts.state.display()))?;
    if opts.restart {
        state.set_len(0)?;
    }

    let channel = crate::client::upstream::connect(&opts.addr, &opts.tls).await?;
    let mut client = pb::tag_service_client::TagServiceClient::with_interceptor(
        channel,
        crate::grpc::auth::BearerInterceptor::from_env()?,
    )
    .max_decoding_message_size(64 << 20);
    let window = opts.window.max(1);
    let (tx, rx) = mpsc::channel::<pb::TagNoteRequest>(window);
    let mut responses = client
        .tag_notes(ReceiverStream::new(rx))
        .await
        .context("opening the TagNotes stream")?
        .into_inner();

    // In flight by note id (ids may repeat in a file: first sent, first answered per id).
    let mut in_flight: HashMap<String, VecDeque<Pending>> = HashMap::new();
    let mut n_in_flight = 0usize;
    let mut retry_at: Vec<(Instant, Pending)> = Vec::new();
    let mut tx = Some(tx);
    tokio::pin!(interrupt);
    let mut interrupted = false;
    loop {
        // Top up the window: due retries first, then new notes.
        while n_in_flight < window && tx.is_some() {
            let now = Instant::now();
            let next = match retry_at.iter().position(|(t, _)| *t <= now) {
                Some(i) => Some(retry_at.swap_remove(i).1),
                None if !interrupted => queue.pop_front(),
                None => None,
            };
            let Some(p) = next else { break };
            let id = p
                .request
                .note
                .as_ref()
                .map(|n| n.note_id.clone())
                .unwrap_or_default();
            let Some(sender) = tx.as_ref() else { break };
            if sender.send(p.request.clone()).await.is_err() {
                anyhow::bail!("the server closed the stream");
            }
            in_flight.entry(id).or_default().push_back(p);
            n_in_flight += 1;
        }
        if n_in_flight == 0 && retry_at.is_empty() && (queue.is_empty() || interrupted) {
            break;
        }
        let wait_retry = retry_at
            .iter()
            .map(|(t, _)| *t)
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            msg = responses.next(), if n_in_flight > 0 => {
                let resp = match msg {
                    Some(Ok(r)) => r,
                    Some(Err(status)) => anyhow::bail!(
                        "the TagNotes stream failed: {}: {} (rerun to resume; {} notes acknowledged so far)",
                        code_name(status.code() as i32), status.message(), summary.tagged + summary.reused
                    ),
                    None => anyhow::bail!("the server ended the stream with {n_in_flight} notes unanswered (rerun to resume)"),
                };
                let Some(mut p) = in_flight.get_mut(&resp.note_id).and_then(VecDeque::pop_front) else {
                    anyhow::bail!("the server answered note {:?}, which was not sent", resp.note_id);
                };
                n_in_flight -= 1;
                match resp.error {
                    None => {
                        writeln!(state, "{}", resp.note_id)?;
                        if resp.reused { summary.reused += 1 } else { summary.tagged += 1 }
                        bar.inc(1);
                    }
                    Some(e) if p.attempts < opts.retries
                        && (e.code == tonic::Code::ResourceExhausted as i32
                            || e.code == tonic::Code::Unavailable as i32) =>
                    {
                        let backoff = Duration::from_millis(250) * 2u32.pow(p.attempts.min(6));
                        p.attempts += 1;
                        summary.retried += 1;
                        retry_at.push((Instant::now() + backoff, p));
                    }
                    Some(e) => {
                        fail(&mut summary, p.line, &resp.note_id, code_name(e.code), &e.message)?;
                        bar.inc(1);
                    }
                }
                bar.set_message(format!("{} failed", summary.failed_total()));
            }
            () = tokio::time::sleep(wait_retry), if !retry_at.is_empty() => {}
            () = &mut interrupt, if !interrupted => {
                interrupted = true;
                // Waiting retries are left for the next run, like the notes not yet sent.
                summary.unsent += retry_at.len();
                retry_at.clear();
                bar.println("interrupted: finishing the notes in flight");
            }
        }
    }
    // Closing our half ends the stream.
    drop(tx.take());
    state.sync_all()?;
    failures.flush()?;
    summary.unsent += queue.len();
    summary.seconds = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(summary)
}
