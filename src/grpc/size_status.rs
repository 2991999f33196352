//! A request over `server.max_decoding_message_bytes` is refused inside tonic's codec, before any
//! handler, with `OUT_OF_RANGE`. gRPC's status-code guide names `RESOURCE_EXHAUSTED` for a message
//! over a size limit, and that is what clients retry or alert on; this layer rewrites that one
//! status (a trailers-only response whose message is tonic's size error) and nothing else.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

/// Tower layer applying the rewrite.
#[derive(Debug, Clone, Copy, Default)]
pub struct SizeStatusLayer;

impl<S> tower_layer::Layer<S> for SizeStatusLayer {
    type Service = SizeStatus<S>;

    fn layer(&self, inner: S) -> SizeStatus<S> {
        SizeStatus { inner }
    }
}

/// The service [`SizeStatusLayer`] wraps.
#[derive(Debug, Clone)]
pub struct SizeStatus<S> {
    inner: S,
}

const OUT_OF_RANGE: &[u8] = b"11";
const RESOURCE_EXHAUSTED: &str = "8";

fn rewrite<B>(resp: &mut http::Response<B>) {
    let h = resp.headers_mut();
    let too_large = h.get("grpc-status").map(|v| v.as_bytes()) == Some(OUT_OF_RANGE)
        && h.get("grpc-message")
            .map(|m| {
                // grpc-message is percent-encoded; tonic encodes spaces, others may not.
                String::from_utf8_lossy(m.as_bytes())
                    .replace("%20", " ")
                    .contains("message length too large")
            })
            .unwrap_or(false);
    if too_large {
        h.insert(
            "grpc-status",
            http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
        );
    }
}

impl<S, Req, B> tower_service::Service<Req> for SizeStatus<S>
where
    S: tower_service::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<B>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite(&mut resp);
            Ok(resp)
        })
    }
}
