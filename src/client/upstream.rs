//! How tagllm's own clients (`tagllm backfill`, a replica following its primary) reach a server:
//! an address or URL, and for `https://` a CA to trust and optionally a client certificate (for a
//! server that requires mutual TLS). The bearer token is added separately
//! ([`crate::grpc::auth::BearerInterceptor`]).

use std::path::PathBuf;

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// TLS material for an `https://` upstream (PEM files).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    /// CA that the server's certificate must chain to; required for `https://`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain, for servers that require one.
    pub cert_file: Option<PathBuf>,
    /// Client private key.
    pub key_file: Option<PathBuf>,
}

/// `host:port` becomes `http://host:port`; URLs are kept.
pub fn url(addr: &str) -> String {
    let a = addr.trim();
    if a.contains("://") {
        a.to_string()
    } else {
        format!("http://{a}")
    }
}

/// An endpoint for `addr`, with TLS configured when it is an `https://` URL.
pub fn endpoint(addr: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let u = url(addr);
    let ep = Endpoint::from_shared(u.clone()).with_context(|| format!("address {addr}"))?;
    if !u.starts_with("https://") {
        if tls.ca_file.is_some() || tls.cert_file.is_some() {
            anyhow::bail!("{addr}: TLS files given for a plaintext address (use https://)");
        }
        return Ok(ep);
    }
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let Some(ca) = &tls.ca_file else {
        anyhow::bail!("{addr}: an https:// upstream needs a CA file to trust");
    };
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => c = c.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => anyhow::bail!("{addr}: a client certificate needs both its cert and key files"),
    }
    ep.tls_config(c).context("configuring TLS")
}

/// Connects to `addr` (see [`endpoint`]).
pub async fn connect(addr: &str, tls: &ClientTls) -> anyhow::Result<Channel> {
    endpoint(addr, tls)?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}
