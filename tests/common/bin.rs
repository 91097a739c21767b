//! The real `byokd` binary and the real engines it talks to: spawn `byokd` commands and
//! `serve`, moto's KMS server, and a throwaway PostgreSQL database on the local server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{Env, client, request};

pub const BIN: &str = env!("CARGO_BIN_EXE_byokd");

/// Credentials moto accepts; real AWS would get them from the standard chain.
pub const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

pub fn byokd(cfg: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    byokd_env(cfg, args, stdin, &[])
}

pub fn byokd_env(cfg: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("BYOKD_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        pipe.write_all(s.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// Runs a command that must exit by itself within `limit`, such as `serve` refusing to start:
/// one that is still running then is killed and fails the test with what it printed, so a
/// `serve` that wrongly starts cannot hang the test. A child that exits before reading its
/// stdin is fine (the write's broken pipe is ignored).
pub fn byokd_exits_within(
    cfg: &Path,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("BYOKD_LOG")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        let _ = pipe.write_all(s.as_bytes());
    }
    drop(pipe);
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "byokd {args:?} still running after {limit:?}: {}{}",
                String::from_utf8_lossy(&read(&out)),
                String::from_utf8_lossy(&read(&err))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: read(&out),
        stderr: read(&err),
    }
}

/// Runs a command that must succeed; its stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "byokd failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Served {
    pub child: Child,
    pub data: String,
    pub admin: String,
    pub out: std::path::PathBuf,
    pub err: std::path::PathBuf,
}

impl Served {
    pub fn logs(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn serve(env: &Env) -> Served {
    serve_env(env, "serve", &[]).await
}

/// Starts `byokd serve` on free ports; `name` keeps the log files of several replicas apart.
pub async fn serve_env(env: &Env, name: &str, vars: &[(&str, &str)]) -> Served {
    let (dp, ap) = (free_port(), free_port());
    let out = env.dir.path().join(format!("{name}.out"));
    let err = env.dir.path().join(format!("{name}.err"));
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config_path)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{dp}"),
            "--admin-listen",
            &format!("127.0.0.1:{ap}"),
        ])
        // The most verbose logging byokd has: the canary must not appear even here.
        .env("BYOKD_LOG", "trace")
        .envs(vars.iter().copied())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let s = Served {
        child,
        data: format!("http://127.0.0.1:{dp}"),
        admin: format!("127.0.0.1:{ap}"),
        out,
        err,
    };
    let t = Instant::now();
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_millis(500),
            client().request(request(
                "GET",
                &format!("http://{}/readyz", s.admin),
                &[],
                "",
            )),
        )
        .await
            && r.status() == 200
        {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "byokd did not become ready: {}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

pub fn sigterm(child: &Child) {
    signal(child, "TERM");
}

/// moto's KMS server on a free port, killed on drop.
pub struct Moto {
    pub child: Child,
    pub url: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server not found: run `bash .ci/deps` (pip install 'moto[server]')");
        let m = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "moto did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        m
    }

    /// A KMS client for the test itself (creating keys and aliases), with moto's credentials.
    pub async fn client(&self) -> aws_sdk_kms::Client {
        let creds = aws_sdk_kms::config::Credentials::new("testing", "testing", None, None, "test");
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(creds)
            .build();
        aws_sdk_kms::Client::from_conf(conf)
    }

    /// Creates a symmetric key; its ARN.
    pub async fn create_key(&self) -> String {
        let out = self.client().await.create_key().send().await.unwrap();
        out.key_metadata().unwrap().arn().unwrap().to_string()
    }

    pub async fn alias(&self, alias: &str, arn: &str) {
        let c = self.client().await;
        if c.update_alias()
            .alias_name(alias)
            .target_key_id(arn)
            .send()
            .await
            .is_err()
        {
            c.create_alias()
                .alias_name(alias)
                .target_key_id(arn)
                .send()
                .await
                .unwrap();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh database on the local PostgreSQL (127.0.0.1:5432, trust auth), dropped at the end,
/// so tests running in parallel never share tables.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/test";

impl PgDb {
    pub async fn create() -> PgDb {
        let name = format!("byokd_t{}_{:x}", std::process::id(), rand_u64());
        let (c, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 (database test) is needed for this test");
        tokio::spawn(conn);
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        PgDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    }
}

/// Deletes every key under `prefix` from the machine's Redis, leaving it as it was.
pub fn redis_forget(prefix: &str) {
    let keys = Command::new("redis-cli")
        .args(["-p", "6379", "--scan", "--pattern"])
        .arg(format!("{prefix}*"))
        .output()
        .unwrap();
    for k in String::from_utf8_lossy(&keys.stdout).lines() {
        let _ = Command::new("redis-cli")
            .args(["-p", "6379", "DEL", k])
            .output();
    }
}

/// A random number for names that must not collide between test runs.
pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(7);
    h.finish() >> 16
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Synchronous on purpose: the runtime may be gone when this runs.
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
