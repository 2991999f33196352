//! `tagllm serve`: the gRPC server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tagllm::server;

use super::CommonArgs;

/// Arguments of `tagllm serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Listen address.
    #[arg(long)]
    addr: Option<std::net::SocketAddr>,
    /// Store directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Refuses bad config before binding a port, then serves until a shutdown signal.
pub fn run(args: ServeArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let cfg = args.common.config(|cfg| {
        if let Some(a) = args.addr {
            cfg.server.addr = a;
        }
        if let Some(d) = args.data_dir {
            cfg.data_dir = d;
        }
    })?;
    server::load_guidance(&cfg)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.server.addr)
            .await
            .with_context(|| format!("binding {}", cfg.server.addr))?;
        server::run(cfg, listener, server::shutdown_signal()).await
    })
}
