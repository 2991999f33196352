//! Optional bearer-token auth on every RPC except `grpc.health.v1.Health` (probes carry no
//! secrets). Tokens come from a file (one per line, so a rotation can accept the old and the new
//! token for a while) or from the `TAGLLM_AUTH_TOKEN` environment variable; they never enter the
//! config struct, logs or errors, and are compared in constant time.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use subtle::ConstantTimeEq;

/// The environment variable a token may come from when no file is configured.
pub const TOKEN_ENV: &str = "TAGLLM_AUTH_TOKEN";

/// Accepted tokens (never printed: `Debug` shows only their count).
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

impl Tokens {
    /// Loads tokens from `file` (non-empty lines, trimmed), else from [`TOKEN_ENV`]; `None` when
    /// neither is set (auth off). A configured file that is missing or holds no token is an error.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Option<Tokens>> {
        let tokens: Vec<Vec<u8>> = match file {
            Some(f) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    anyhow::anyhow!("auth.token_file {}: cannot be read: {e}", f.display())
                })?;
                let t: Vec<Vec<u8>> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec())
                    .collect();
                if t.is_empty() {
                    anyhow::bail!("auth.token_file {}: holds no token", f.display());
                }
                t
            }
            None => match std::env::var(TOKEN_ENV) {
                Ok(v) if !v.trim().is_empty() => vec![v.trim().as_bytes().to_vec()],
                _ => return Ok(None),
            },
        };
        if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
            anyhow::bail!(
                "auth: a token of {} bytes is too short to be a secret (at least 16)",
                short.len()
            );
        }
        Ok(Some(Tokens(Arc::new(tokens))))
    }

    /// Tokens for tests and embedders.
    pub fn new(tokens: Vec<String>) -> Tokens {
        Tokens(Arc::new(
            tokens.into_iter().map(String::into_bytes).collect(),
        ))
    }

    /// Whether `header` (the `authorization` value) carries an accepted bearer token. Every
    /// token is compared, in constant time, whatever matches first.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(h) = header else { return false };
        let Some(token) = h
            .strip_prefix(b"Bearer ")
            .or_else(|| h.strip_prefix(b"bearer "))
        else {
            return false;
        };
        let mut ok = subtle::Choice::from(0u8);
        for t in self.0.iter() {
            ok |= t.as_slice().ct_eq(token);
        }
        ok.into()
    }
}

/// Client side: adds `authorization: Bearer $TAGLLM_AUTH_TOKEN` to every call when that variable
/// is set (what `tagllm backfill` and a replica following a primary send).
#[derive(Clone, Default)]
pub struct BearerInterceptor(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerInterceptor {
    /// From [`TOKEN_ENV`]; none when unset or empty.
    pub fn from_env() -> anyhow::Result<BearerInterceptor> {
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => {
                let mut v =
                    tonic::metadata::MetadataValue::try_from(format!("Bearer {}", t.trim()))
                        .map_err(|_| anyhow::anyhow!("{TOKEN_ENV} is not a valid header value"))?;
                v.set_sensitive(true);
                Ok(BearerInterceptor(Some(v)))
            }
            _ => Ok(BearerInterceptor(None)),
        }
    }
}

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Tower layer: refuses calls without an accepted token with `UNAUTHENTICATED` (a pass-through
/// when `tokens` is `None`).
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Tokens>,
}

impl AuthLayer {
    /// Requires one of `tokens` (none: auth off).
    pub fn new(tokens: Option<Tokens>) -> AuthLayer {
        AuthLayer { tokens }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Tokens>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Auth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            if !exempt(req.uri().path()) {
                let header = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                if !tokens.accepts(header) {
                    let reason = if header.is_none() {
                        "missing authorization metadata: send `authorization: Bearer <token>`"
                    } else {
                        "the bearer token is not accepted"
                    };
                    tracing::info!(path = req.uri().path(), "unauthenticated call refused");
                    let resp = tonic::Status::unauthenticated(reason).into_http();
                    return Box::pin(async move { Ok(resp) });
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_matched_exactly() {
        let t = Tokens::new(vec![
            "old-token-0123456789".into(),
            "new-token-0123456789".into(),
        ]);
        assert!(t.accepts(Some(b"Bearer new-token-0123456789")));
        assert!(t.accepts(Some(b"bearer old-token-0123456789")));
        assert!(!t.accepts(Some(b"Bearer new-token-012345678")));
        assert!(!t.accepts(Some(b"Bearer new-token-01234567890")));
        assert!(!t.accepts(Some(b"new-token-0123456789")));
        assert!(!t.accepts(Some(b"Basic new-token-0123456789")));
        assert!(!t.accepts(None));
        assert_eq!(format!("{t:?}"), "Tokens(2 redacted)");
        assert!(exempt("/grpc.health.v1.Health/Check"));
        assert!(!exempt(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }

    #[test]
    fn token_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "\n  a-long-enough-token-1  \n\nanother-long-token-2\n").unwrap();
        let t = Tokens::load(Some(&f)).unwrap().unwrap();
        assert!(t.accepts(Some(b"Bearer a-long-enough-token-1")));
        assert!(t.accepts(Some(b"Bearer another-long-token-2")));
        std::fs::write(&f, "\n\n").unwrap();
        assert!(Tokens::load(Some(&f)).is_err());
        std::fs::write(&f, "short").unwrap();
        let err = Tokens::load(Some(&f)).unwrap_err().to_string();
        assert!(
            err.contains("too short") && !err.contains("short\""),
            "{err}"
        );
        assert!(Tokens::load(Some(&dir.path().join("missing"))).is_err());
    }
}
