//! Prometheus metrics: one process-wide recorder, a tower layer that counts and times every gRPC
//! call by its final status, and the plain-HTTP `/metrics` endpoint on its own port.
//!
//! Series (all prefixed `tagllm_`):
//! - `grpc_requests_total{service,method,code}`, `grpc_request_duration_seconds{..}` (histogram,
//!   until the last byte: a stream's whole life), `grpc_requests_in_flight{service,method}`.
//! - `engine_queue_depth`, `engine_queue_capacity`, `engine_batch_size` (histogram),
//!   `engine_jobs_total{outcome}`, `engine_queue_wait_seconds`, `engine_prefill_seconds`,
//!   `engine_decode_seconds`, `prompt_tokens_total`, `prompt_tokens_cached_total`,
//!   `generated_tokens_total`,
//!   `prefill_tokens_per_second`, `decode_tokens_per_second` (histograms, per job).
//! - `notes_tagged_total{result=generated|reused}`, `tags_dropped_total`.
//! - `cache_lookups_total{result=hit|miss}`, `cache_entries`.
//! - `store_operation_seconds{op}` (histogram), `store_errors_total{op}`.
//! - `build_info{version}`, `model_ready`.
//!
//! Label values are `&'static str` from fixed sets (unknown methods count as `unknown`), so a
//! client cannot blow up the series count.

use std::{
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds): sub-millisecond feature reads up to minute-long streams.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Tokens-per-second buckets.
const RATE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
/// Batch-size buckets (sequences per engine step).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle). `None` when
/// another recorder was installed first (an embedding program's): metrics then go there.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_tokens_per_second".into()),
                        RATE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tagllm_engine_batch_size".into()),
                        BATCH_BUCKETS,
                    )
                });
            let handle = match builder.map(|b| b.install_recorder()) {
                Ok(Ok(h)) => h,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    return None;
                }
            };
            metrics::gauge!("tagllm_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .as_ref()
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; also runs the recorder's
/// upkeep, so histograms do not pile up samples between scrapes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(handle) = install() else {
        return Ok(());
    };
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
        }),
    );
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    upkeep.abort();
    r
}

/// The RPCs with their own series; everything else is `unknown`.
const KNOWN: &[(&str, &str, &str)] = &[
    (
        "/tagllm.v1.TagService/TagNote",
        "tagllm.v1.TagService",
        "TagNote",
    ),
    (
        "/tagllm.v1.TagService/TagNotes",
        "tagllm.v1.TagService",
        "TagNotes",
    ),
    (
        "/tagllm.v1.FeatureService/GetNoteFeatures",
        "tagllm.v1.FeatureService",
        "GetNoteFeatures",
    ),
    (
        "/tagllm.v1.FeatureService/ScanNoteFeatures",
        "tagllm.v1.FeatureService",
        "ScanNoteFeatures",
    ),
    (
        "/tagllm.v1.FeatureService/GetFeatureSchema",
        "tagllm.v1.FeatureService",
        "GetFeatureSchema",
    ),
    (
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.Health",
        "Check",
    ),
    (
        "/grpc.health.v1.Health/Watch",
        "grpc.health.v1.Health",
        "Watch",
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];

fn rpc_labels(path: &str) -> (&'static str, &'static str) {
    KNOWN
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|&(_, s, m)| (s, m))
        .unwrap_or(("unknown", "unknown"))
}

/// gRPC's status code names, as grpc-go and the Prometheus gRPC middlewares spell them.
fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "Canceled",
        b"2" => "Unknown",
        b"3" => "InvalidArgument",
        b"4" => "DeadlineExceeded",
        b"5" => "NotFound",
        b"6" => "AlreadyExists",
        b"7" => "PermissionDenied",
        b"8" => "ResourceExhausted",
        b"9" => "FailedPrecondition",
        b"10" => "Aborted",
        b"11" => "OutOfRange",
        b"12" => "Unimplemented",
        b"13" => "Internal",
        b"14" => "Unavailable",
        b"15" => "DataLoss",
        b"16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// One call being measured. Records exactly once: at its final status, or as `Canceled` when
/// dropped first (the client went away, or the connection broke).
struct Call {
    service: &'static str,
    method: &'static str,
    start: Instant,
    done: bool,
}

impl Call {
    fn new(path: &str) -> Call {
        let (service, method) = rpc_labels(path);
        metrics::gauge!("tagllm_grpc_requests_in_flight", "service" => service, "method" => method)
            .increment(1.0);
        Call {
            service,
            method,
            start: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, code: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        let (service, method) = (self.service, self.method);
        metrics::gauge!("tagllm_grpc_requests_in_flight", "service" => service, "method" => method)
            .decrement(1.0);
        metrics::counter!("tagllm_grpc_requests_total", "service" => service, "method" => method, "code" => code)
            .increment(1);
        metrics::histogram!("tagllm_grpc_request_duration_seconds", "service" => service, "method" => method, "code" => code)
            .record(self.start.elapsed().as_secs_f64());
    }

    fn finish_from(&mut self, headers: &http::HeaderMap) -> bool {
        match headers.get("grpc-status") {
            Some(v) => {
                self.finish(code_name(v.as_bytes()));
                true
            }
            None => false,
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish("Canceled");
    }
}

/// Tower layer measuring every gRPC call (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = Call::new(req.uri().path());
        MeteredFuture {
            inner: self.inner.call(req),
            call: Some(call),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`GrpcMetrics`].
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, B, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match res {
            Ok(resp) => {
                // A trailers-only response (every error from a unary handler) has its status in
                // the headers; otherwise it comes in the trailers at the end of the body.
                if let Some(c) = call.as_mut() {
                    if c.finish_from(resp.headers()) {
                        call = None;
                    }
                }
                Ok(resp.map(|inner| MeteredBody { inner, call }))
            }
            Err(e) => {
                if let Some(mut c) = call {
                    c.finish("Internal");
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// Response body of [`GrpcMetrics`]: records the call when the trailers pass.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(t), Some(c)) = (f.trailers_ref(), this.call.as_mut()) {
                    if c.finish_from(t) {
                        *this.call = None;
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(mut c) = this.call.take() {
                    c.finish("Internal");
                }
            }
            None => {
                if let Some(mut c) = this.call.take() {
                    // Ended without a status: not a well-formed gRPC response.
                    c.finish("Unknown");
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records one finished generation job.
pub fn record_generation(
    queue: Duration,
    prefill_ms: f64,
    decode_ms: f64,
    prompt_tokens: usize,
    cached_prompt_tokens: usize,
    generated_tokens: usize,
) {
    metrics::histogram!("tagllm_engine_queue_wait_seconds").record(queue.as_secs_f64());
    metrics::histogram!("tagllm_engine_prefill_seconds").record(prefill_ms / 1e3);
    metrics::histogram!("tagllm_engine_decode_seconds").record(decode_ms / 1e3);
    metrics::counter!("tagllm_prompt_tokens_total").increment(prompt_tokens as u64);
    metrics::counter!("tagllm_prompt_tokens_cached_total").increment(cached_prompt_tokens as u64);
    metrics::counter!("tagllm_generated_tokens_total").increment(generated_tokens as u64);
    if prefill_ms > 0.0 {
        metrics::histogram!("tagllm_prefill_tokens_per_second")
            .record(prompt_tokens.saturating_sub(cached_prompt_tokens) as f64 / (prefill_ms / 1e3));
    }
    if decode_ms > 0.0 && generated_tokens > 0 {
        metrics::histogram!("tagllm_decode_tokens_per_second")
            .record(generated_tokens as f64 / (decode_ms / 1e3));
    }
}

/// Times one store operation and counts its failure.
pub fn time_store<T, E>(op: &'static str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let t0 = Instant::now();
    let r = f();
    metrics::histogram!("tagllm_store_operation_seconds", "op" => op)
        .record(t0.elapsed().as_secs_f64());
    if r.is_err() {
        metrics::counter!("tagllm_store_errors_total", "op" => op).increment(1);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            rpc_labels("/tagllm.v1.FeatureService/GetNoteFeatures"),
            ("tagllm.v1.FeatureService", "GetNoteFeatures")
        );
        assert_eq!(
            rpc_labels("/tagllm.v1.FeatureService/Anything"),
            ("unknown", "unknown")
        );
        assert_eq!(code_name(b"8"), "ResourceExhausted");
        assert_eq!(code_name(b"99"), "Unknown");
    }
}
