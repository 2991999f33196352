//! Test harness: start and stop a real server, connect clients.

use std::{net::SocketAddr, path::Path, time::Duration};

use tagllm::{config::Config, grpc::pb};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// Repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The default model; the tests fail (not skip) without it.
pub fn model_path() -> std::path::PathBuf {
    fetched(
        "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "models/fetch_default_model.sh",
    )
}

/// The qwen2 base (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M), which `scripts/test-deps.sh` fetches.
pub fn qwen2_path() -> std::path::PathBuf {
    fetched(
        "models/qwen2/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "models/fetch_model.sh qwen2.5-coder-0.5b",
    )
}

/// A fetched model file under the repository; a clear failure naming `fetch` when it is missing.
fn fetched(path: &str, fetch: &str) -> std::path::PathBuf {
    let p = root().join(path);
    assert!(p.is_file(), "{} is missing: run {fetch}", p.display());
    p
}

/// Config for a test server storing in `data_dir`.
pub fn test_config(data_dir: &Path) -> Config {
    let mut cfg = Config {
        data_dir: data_dir.to_path_buf(),
        handbook: root().join("models/handbook.toml"),
        schema: root().join("models/features.toml"),
        ..Config::default()
    };
    cfg.model.path = model_path();
    cfg.model.max_new_tokens = 48;
    cfg.server.shutdown_grace_secs = 5;
    // Several servers share one test process (and one metrics recorder): no metrics port.
    cfg.server.metrics_addr = None;
    cfg
}

/// A running server.
pub struct App {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<anyhow::Result<()>>>,
}

impl App {
    /// Starts a server on 127.0.0.1:0 and waits until its model is warm (health SERVING).
    pub async fn spawn(cfg: Config) -> App {
        App::spawn_until(cfg, "").await
    }

    /// Starts a server and waits until health reports `service` SERVING.
    pub async fn spawn_until(cfg: Config, service: &str) -> App {
        let app = App::start(cfg).await;
        app.wait_serving(service).await;
        app
    }

    /// Starts a server on 127.0.0.1:0 without waiting for it.
    pub async fn start(cfg: Config) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(tagllm::server::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        App {
            addr,
            stop: Some(stop),
            join: Some(join),
        }
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// `service`'s health status now.
    pub async fn health(&self, service: &str) -> i32 {
        self.try_health(service)
            .await
            .expect("the server answers a health check")
    }

    /// `service`'s health status now, if the server answers.
    pub async fn try_health(&self, service: &str) -> Option<i32> {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(r.into_inner().status)
    }

    /// Waits (up to 120 s) for `service`'s health to be SERVING.
    pub async fn wait_serving(&self, service: &str) {
        assert!(self.serving_unless(service, || false).await);
    }

    /// Waits (up to 120 s) for `service`'s health to be SERVING; false as soon as `gone()` says
    /// the server is gone.
    async fn serving_unless(&self, service: &str, mut gone: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if gone() {
                return false;
            }
            if self.try_health(service).await == Some(ServingStatus::Serving as i32) {
                return true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server never became SERVING"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn tag_client(&self) -> pb::tag_service_client::TagServiceClient<Channel> {
        pb::tag_service_client::TagServiceClient::new(self.channel().await)
    }

    pub async fn feature_client(
        &self,
    ) -> pb::feature_service_client::FeatureServiceClient<Channel> {
        pb::feature_service_client::FeatureServiceClient::new(self.channel().await)
    }

    /// Graceful shutdown; returns once the server has released the store and the model.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.join.take().unwrap().await.unwrap().unwrap();
    }
}

/// A note from `tests/fixtures/notes/<name>.json` as a proto note.
pub fn fixture_note(name: &str) -> pb::Note {
    let text =
        std::fs::read_to_string(root().join(format!("tests/fixtures/notes/{name}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    pb::Note {
        note_id: v["note_id"].as_str().unwrap().into(),
        category: v["category"].as_str().unwrap().into(),
        title: v["title"].as_str().unwrap().into(),
        body: v["body"].as_str().unwrap().into(),
        images: vec![],
        updated_at_ms: v["updated_at_ms"].as_i64().unwrap_or(0),
    }
}

/// A free loopback port (bound then released; the window for a clash is tiny on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `tagllm` binary serving as a child process, with its own metrics registry; killed
/// (SIGKILL) on drop unless stopped first.
pub struct Proc {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    child: std::process::Child,
}

impl Proc {
    /// Starts `tagllm serve` on free ports over `data_dir` with the test model settings, plus
    /// `env` (`TAGLLM__...` overrides), and waits for `service` to be SERVING.
    ///
    /// [`free_port`] frees its port before the child binds it, so a test running beside this one
    /// can take it in between; a child that exits before serving (its port taken) is started
    /// again on fresh ports, up to three times.
    pub async fn spawn(data_dir: &Path, env: &[(&str, &str)], service: &str) -> Proc {
        for _ in 0..3 {
            let mut p = Proc::start(data_dir, env);
            if p.serving_unless_exited(service).await {
                return p;
            }
        }
        panic!("tagllm serve exited before serving, three times (see its stderr above)");
    }

    /// Waits (up to 120 s) for `service` to be SERVING; false if the child exits first.
    async fn serving_unless_exited(&mut self, service: &str) -> bool {
        let app = self.client();
        let child = &mut self.child;
        app.serving_unless(service, || matches!(child.try_wait(), Ok(Some(_))))
            .await
    }

    /// Starts `tagllm serve` like [`Proc::spawn`] without waiting for it.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Proc {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tagllm"));
        cmd.current_dir(root())
            .args(["serve", "--addr", &addr.to_string(), "--data-dir"])
            .arg(data_dir)
            .env("TAGLLM__SERVER__METRICS_ADDR", metrics_addr.to_string())
            .env("TAGLLM__MODEL__MAX_NEW_TOKENS", "48")
            .env("TAGLLM__SERVER__SHUTDOWN_GRACE_SECS", "5")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting the tagllm binary");
        Proc {
            addr,
            metrics_addr,
            child,
        }
    }

    /// A handle for the client helpers (it does not own the server).
    pub fn client(&self) -> App {
        App {
            addr: self.addr,
            stop: None,
            join: None,
        }
    }

    /// `GET /metrics` as text.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no warning: a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test virtualenv (made by `scripts/test-deps.sh`): grpcurl, the Python client, pytest.
pub fn test_venv() -> std::path::PathBuf {
    let venv = std::env::var_os("TAGLLM_TEST_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-venv"));
    assert!(
        venv.join("bin/python").is_file() && venv.join("bin/grpcurl").is_file(),
        "{} is missing or incomplete: run scripts/test-deps.sh",
        venv.display()
    );
    venv
}

/// Runs `tagllm backfill --quiet ARGS`, with `TAGLLM_AUTH_TOKEN` set to `token` (or unset);
/// returns the exit code (-1 when killed by a signal) and stdout + stderr.
pub fn backfill(args: &[&std::ffi::OsStr], token: Option<&str>) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tagllm"));
    cmd.args(["backfill", "--quiet"])
        .args(args)
        .env_remove("TAGLLM_AUTH_TOKEN");
    if let Some(t) = token {
        cmd.env("TAGLLM_AUTH_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

impl App {
    /// Every stored note, as ScanNoteFeatures streams it (with tags).
    pub async fn scan_all(&self) -> Vec<pb::NoteFeatures> {
        let mut s = self
            .feature_client()
            .await
            .scan_note_features(pb::ScanNoteFeaturesRequest {
                include_tags: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(n) = s.message().await.unwrap() {
            out.push(n);
        }
        out
    }
}

/// Runs `tagllm build-data ARGS`; returns the exit code and stdout + stderr.
pub fn build_data(args: &[&str], out: &Path) -> (i32, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tagllm"))
        .current_dir(root())
        .arg("build-data")
        .args(args)
        .arg("--out")
        .arg(out)
        .args(["--quiet", "--adapter", "none"])
        .env("RUST_LOG", "warn")
        .env_remove("TAGLLM_TEACHER_URL")
        .env_remove("TAGLLM_TEACHER_KEY")
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), output_text(&o))
}

/// A finished child's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// (extracted, already done, failed) from build-data's summary line.
pub fn counts(text: &str) -> (usize, usize, usize) {
    let line = text
        .lines()
        .find(|l| l.contains(" extracted, "))
        .unwrap_or_else(|| panic!("no summary in:\n{text}"));
    let n: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (n[0], n[1], n[2])
}

/// A JSONL file's records (none if it is missing).
pub fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
