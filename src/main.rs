//! `tagllm`: serve (`tagllm serve`), tag one note without a server (`tagllm tag`), backfill a
//! JSONL file through a server (`tagllm backfill`), evaluate decoding (`tagllm eval`), or build
//! teacher data and train a student (`tagllm build-data`, `tagllm distill`). One file per
//! subcommand under `src/cli/`.

mod cli;

fn main() -> anyhow::Result<()> {
    cli::main()
}
