//! `tagllm backfill`: a JSONL file through a running server's TagNotes stream.

use std::path::PathBuf;

use clap::Args;
use tagllm::{
    client::{backfill, upstream::ClientTls},
    server,
};

/// Arguments of `tagllm backfill`.
#[derive(Args)]
pub struct BackfillArgs {
    /// Notes, one JSON object per line: {"note_id", "category", "title", "body",
    /// "images": [uri...], "updated_at_ms"}; other fields are ignored.
    pub notes: PathBuf,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Acknowledged ids (default: NOTES.done).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Failed notes as JSONL (default: NOTES.failed).
    #[arg(long)]
    pub failures: Option<PathBuf>,
    /// Forget the state file and send every note again.
    #[arg(long)]
    pub restart: bool,
    /// Regenerate even when the stored tags are current.
    #[arg(long)]
    pub force: bool,
    /// Notes in flight at once.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Retries per note refused for overload, with exponential backoff from 250 ms.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
    /// Send at most this many new notes (0: all), e.g. for a canary run.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// CA to trust for an https:// address (PEM).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for a server that requires mutual TLS.
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

/// Runs the backfill; exits 1 when a note failed, 2 when the run broke.
pub fn run(args: BackfillArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let BackfillArgs {
        notes,
        addr,
        state,
        failures,
        restart,
        force,
        window,
        retries,
        limit,
        quiet,
        ca_file,
        cert_file,
        key_file,
    } = args;
    let opts = backfill::BackfillOptions {
        state: state.unwrap_or_else(|| backfill::default_state(&notes)),
        failures: failures.unwrap_or_else(|| backfill::default_failures(&notes)),
        input: notes,
        addr,
        restart,
        force,
        window,
        retries,
        limit,
        progress: !quiet,
        tls: ClientTls {
            ca_file,
            cert_file,
            key_file,
        },
    };
    let failures = opts.failures.clone();
    match rt.block_on(backfill::run(opts, server::shutdown_signal())) {
        Ok(summary) => {
            println!("{summary}");
            if summary.failed_total() > 0 {
                println!("failed notes: {}", failures.display());
                std::process::exit(1);
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("backfill stopped: {e:#}");
            std::process::exit(2);
        }
    }
}
