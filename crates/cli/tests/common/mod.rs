//! Test harness: the built `subrosa` and `subrosa-server` binaries in
//! temporary directories, talking over loopback.
#![allow(dead_code)]

pub mod v1;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PASS: &str = "correct horse battery staple";

pub fn subrosa_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_subrosa"))
}

/// A binary of package `package` beside `subrosa` in the target dir: built
/// by `cargo test --workspace`, and built here when a narrower run left it out.
fn workspace_bin(package: &str, name: &str) -> PathBuf {
    let bin = subrosa_bin().with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", name]);
        if bin.to_string_lossy().contains("/release/") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building {name} failed");
    }
    bin
}

/// `subrosa-server`.
pub fn server_bin() -> PathBuf {
    workspace_bin("subrosa-server", "subrosa-server")
}

/// `subrosa-attack-server`, the test-only malicious operator.
pub fn attack_server_bin() -> PathBuf {
    workspace_bin("subrosa-attack-server", "subrosa-attack-server")
}

/// A real `subrosa-server` process on a free loopback port.
pub struct Server {
    child: Child,
    bin: PathBuf,
    pub url: String,
    pub dir: tempfile::TempDir,
    /// The metrics endpoint's address, as the server printed it (with
    /// `--metrics-listen`, which may name port 0).
    pub metrics: Option<String>,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Self::start_bin(server_bin(), extra)
    }

    /// A real server over a copy of the data directory `data` (a fixture
    /// made by an older release: it must migrate in place).
    pub fn start_on_copy_of(data: &Path, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(data, &dir.path().join("data"));
        let bin = server_bin();
        let (child, url, metrics) = Self::spawn(&bin, &dir, "127.0.0.1:0", extra);
        Server { child, bin, url, dir, metrics }
    }

    /// The test-only malicious operator over a copy of the data directory
    /// `data` (a fixture made by an older release).
    pub fn start_malicious_on_copy_of(data: &Path) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(data, &dir.path().join("data"));
        let bin = attack_server_bin();
        let (child, url, metrics) = Self::spawn(&bin, &dir, "127.0.0.1:0", &[]);
        Server { child, bin, url, dir, metrics }
    }

    /// The test-only malicious operator (`subrosa-attack-server`): honest
    /// until [`Server::attack`] writes a plan.
    pub fn start_malicious() -> Server {
        Self::start_malicious_with(&[])
    }

    /// [`Server::start_malicious`] with `extra` arguments.
    pub fn start_malicious_with(extra: &[&str]) -> Server {
        Self::start_bin(attack_server_bin(), extra)
    }

    fn start_bin(bin: PathBuf, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, url, metrics) = Self::spawn(&bin, &dir, "127.0.0.1:0", extra);
        Server { child, bin, url, dir, metrics }
    }

    /// Switches the malicious operator's attacks (read on every request).
    pub fn attack(&self, plan: serde_json::Value) {
        let tmp = self.data_dir().join("attacks.json.tmp");
        std::fs::write(&tmp, plan.to_string()).expect("write plan");
        std::fs::rename(&tmp, self.data_dir().join("attacks.json")).expect("install plan");
    }

    /// Kills the server without warning (SIGKILL) and starts it again on
    /// the same address over the same data.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.restart_with(&[]);
    }

    /// Kills the server without warning (SIGKILL) and leaves it down.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same address over the same
    /// data, with `extra` arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        let addr = self.url.trim_start_matches("http://").to_string();
        let (child, url, metrics) = Self::spawn(&self.bin, &self.dir, &addr, extra);
        assert_eq!(url, self.url);
        self.child = child;
        self.metrics = metrics;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(bin: &Path, dir: &tempfile::TempDir, listen: &str, extra: &[&str]) -> (Child, String, Option<String>) {
        let data = dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("server.log"))
            .expect("log file");
        let mut child = Command::new(bin)
            .args(["--listen", listen, "--data"])
            .arg(&data)
            .args(extra)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("server starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout);
        let mut first = String::new();
        lines.read_line(&mut first).expect("server prints its address");
        let url = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        // With a metrics endpoint, its address comes next (port 0 picks a
        // free one: no race with other tests for a port chosen beforehand).
        let metrics = extra.contains(&"--metrics-listen").then(|| {
            let mut line = String::new();
            lines.read_line(&mut line).expect("server prints its metrics address");
            line.trim()
                .strip_prefix("metrics on http://")
                .and_then(|a| a.strip_suffix("/metrics"))
                .unwrap_or_else(|| panic!("unexpected metrics line {line:?}"))
                .to_string()
        });
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        (child, url, metrics)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data_dir().join("server.db")).expect("server db opens")
    }

    pub fn count(&self, table: &str) -> i64 {
        self.db().query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).expect("count")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One user with one device in its own home directory.
pub struct User {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl User {
    pub fn register(server: &Server, name: &str) -> User {
        let u = User { name: name.into(), dir: tempfile::tempdir().expect("tempdir") };
        let out = u.run(&["register", name, "--server", &server.url]);
        assert!(out.status.success(), "register {name}: {}", stderr(&out));
        u
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(subrosa_bin());
        c.arg("--home")
            .arg(self.home())
            .args(args)
            .env("SUBROSA_PASSPHRASE", PASS)
            // Each command derives its key, as before the session key cache:
            // the tests of the cache (key_cache.rs) turn it on themselves.
            .env("SUBROSA_KEY_CACHE", "off")
            .env_remove("SUBROSA_HOME")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("subrosa runs")
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{} {:?} failed: {}", self.name, args, stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn send(&self, to: &str, text: &str) {
        self.ok(&["send", to, text]);
    }

    /// `receive --json`, parsed.
    pub fn receive_json(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["receive", "--json"];
        args.extend_from_slice(extra);
        parse_json_lines(&self.ok(&args))
    }

    pub fn history_json(&self, target: &str) -> Vec<serde_json::Value> {
        parse_json_lines(&self.ok(&["history", target, "--json"]))
    }
}

pub fn parse_json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn texts(msgs: &[serde_json::Value]) -> Vec<String> {
    msgs.iter().map(|m| m["text"].as_str().unwrap_or_default().to_string()).collect()
}

/// Asserts a failed command: non-zero exit, exactly one line on stderr
/// containing `needle`, no panic.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stderr {err:?}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got {err:?}");
    assert!(err.to_lowercase().contains(&needle.to_lowercase()), "stderr {err:?} lacks {needle:?}");
}

/// An HTTP server on 127.0.0.1 that counts every connection: the canary.
pub struct Canary {
    pub url: String,
    pub hits: Arc<AtomicUsize>,
}

impl Canary {
    pub fn start() -> Canary {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind canary");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                h.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut s) = stream {
                    use std::io::Write;
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            }
        });
        let token: u64 = rand_token();
        Canary { url: format!("http://{addr}/secret-invite/{token:016x}"), hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub fn rand_token() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64) ^ (std::process::id() as u64).rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15
}

/// Every file below `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(p);
                }
            }
        }
    }
    found
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// The server's own sockets that are neither its listener nor connections
/// accepted on its port: outbound connections (TCP) and any UDP socket (a
/// DNS lookup would be one). Read from /proc, so Linux only.
#[cfg(target_os = "linux")]
pub fn foreign_sockets(pid: u32, listen_port: u16) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || !inodes.contains(cols[9]) {
                continue;
            }
            let port = cols[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()).unwrap_or(0);
            let tcp = table.starts_with("tcp");
            if !tcp || port != listen_port {
                found.push(format!("{table} {} -> {} state {}", cols[1], cols[2], cols[3]));
            }
        }
    }
    found
}

/// Samples [`foreign_sockets`] every few milliseconds until dropped.
#[cfg(target_os = "linux")]
pub struct SocketWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    samples: Arc<AtomicUsize>,
}

#[cfg(target_os = "linux")]
impl SocketWatch {
    pub fn start(server: &Server) -> SocketWatch {
        let pid = server.pid();
        let port: u16 = server.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let samples = Arc::new(AtomicUsize::new(0));
        let (s, v, n) = (stop.clone(), seen.clone(), samples.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let found = foreign_sockets(pid, port);
                if !found.is_empty() {
                    v.lock().unwrap_or_else(|p| p.into_inner()).extend(found);
                }
                n.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        SocketWatch { stop, seen, samples }
    }

    /// Stops and returns what was seen and how many samples were taken.
    pub fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (seen, self.samples.load(Ordering::SeqCst))
    }
}

/// Plays the operator: plants a device for `handle` certified by an identity
/// key of the operator's own, with key packages, straight in the server's
/// database. Returns the planted identity.
pub fn plant_device(server: &Server, handle: &str, key_packages: usize) -> subrosa_core::DeviceIdentity {
    let (fake, engine) = fake_device(handle);
    let db = server.db();
    db.execute(
        "INSERT INTO devices (handle, device_id, signature_key, certificate, active, created_at) VALUES (?1, ?2, ?3, ?4, 1, 0)",
        rusqlite::params![handle, fake.device_id().to_hex(), fake.device_public(), fake.certificate().to_bytes().expect("c")],
    )
    .expect("planted device");
    let id = db.last_insert_rowid();
    // Of both suites, as every device of this version publishes them.
    for suite in subrosa_core::SUITES {
        for _ in 0..key_packages {
            db.execute(
                "INSERT INTO key_packages (device, suite, data) VALUES (?1, ?2, ?3)",
                rusqlite::params![id, u16::from(suite), engine.generate_key_package_in(suite).expect("kp")],
            )
            .expect("planted key package");
        }
    }
    fake
}

pub type FakeEngine = subrosa_core::Engine<
    subrosa_core::DefaultCrypto,
    mls_rs::storage_provider::in_memory::InMemoryGroupStateStorage,
    mls_rs::storage_provider::in_memory::InMemoryKeyPackageStorage,
>;

/// A device the operator makes up for `handle`, certified by an identity
/// key of its own (not the account's), and an engine to make key packages.
pub fn fake_device(handle: &str) -> (subrosa_core::DeviceIdentity, FakeEngine) {
    use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
    let crypto = subrosa_core::default_crypto();
    let fake = subrosa_core::DeviceIdentity::generate(&crypto, handle.parse().expect("handle"), 1).expect("identity");
    let engine = subrosa_core::Engine::new(
        crypto,
        fake.clone(),
        InMemoryGroupStateStorage::new(),
        InMemoryKeyPackageStorage::new(),
    );
    (fake, engine)
}

/// The wire form of a device record, as the server lists it.
pub fn device_record(id: &subrosa_core::DeviceIdentity) -> serde_json::Value {
    serde_json::to_value(subrosa_proto::DeviceRecord {
        device_id: id.device_id(),
        signature_key: subrosa_proto::B64(id.device_public().to_vec()),
        certificate: subrosa_proto::B64(id.certificate().to_bytes().expect("certificate")),
    })
    .expect("json")
}

/// Bytes as the wire's base64.
pub fn b64(bytes: &[u8]) -> serde_json::Value {
    serde_json::to_value(subrosa_proto::B64(bytes.to_vec())).expect("json")
}

/// Copies the directory `from` (files and subdirectories) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The exit status of a send or commit stored here but not yet on the server.
pub const EXIT_PENDING: i32 = 75;

/// A process's exit code (-1 when a signal ended it).
pub fn exit_code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Starts `link` on a new device and returns the process and its code.
pub fn start_link(server: &Server, new: &User, handle: &str, extra: &[&str]) -> (Child, String) {
    let mut args = vec!["link", handle, "--server", server.url.as_str(), "--timeout", "60"];
    args.extend_from_slice(extra);
    let mut child = new.cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn link");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("code line");
    let code = line.trim().strip_prefix("code: ").unwrap_or_else(|| panic!("no code in {line:?}")).to_string();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    });
    (child, code)
}

/// A JSON-RPC 2.0 client over any line stream: a daemon's Unix socket,
/// or the stdio of `subrosa daemon --stdio`.
pub struct Rpc<R: BufRead, W: Write> {
    pub read: R,
    pub write: W,
    pub next: u64,
    /// Notifications read while waiting for answers.
    pub seen: Vec<serde_json::Value>,
}

impl<R: BufRead, W: Write> Rpc<R, W> {
    pub fn line(&mut self, raw: &[u8]) {
        self.write.write_all(raw).expect("write");
        self.write.write_all(b"\n").expect("write");
        self.write.flush().expect("flush");
    }

    pub fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.read.read_line(&mut line).expect("read an answer");
        assert!(n > 0, "the daemon closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The next answer (not a notification).
    pub fn answer(&mut self) -> serde_json::Value {
        loop {
            let v = self.read();
            if v.get("method").is_some() {
                self.seen.push(v);
            } else {
                return v;
            }
        }
    }

    /// Calls `method`; the whole answer.
    pub fn call_raw(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next += 1;
        let id = self.next;
        let req = serde_json::json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        self.line(req.to_string().as_bytes());
        let answer = self.answer();
        assert_eq!(answer["id"], serde_json::json!(id), "{answer}");
        answer
    }

    /// Calls `method`; its result, which must not be an error.
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let a = self.call_raw(method, params);
        assert!(a.get("error").is_none(), "{method}: {a}");
        a["result"].clone()
    }

    /// Every notification left on the connection, until it closes.
    pub fn drain(&mut self) -> Vec<serde_json::Value> {
        let mut all = std::mem::take(&mut self.seen);
        let mut line = String::new();
        while self.read.read_line(&mut line).unwrap_or(0) > 0 {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                all.push(v);
            }
            line.clear();
        }
        all
    }

    /// The next notification of any kind.
    pub fn any_notification(&mut self) -> serde_json::Value {
        if !self.seen.is_empty() {
            return self.seen.remove(0);
        }
        self.read()
    }

    /// The next message notification (the daemon's connection changes,
    /// which may come at any time, skipped).
    pub fn notification(&mut self) -> serde_json::Value {
        loop {
            let v = self.any_notification();
            if v["method"] != "connection" {
                assert_eq!(v["method"], "message", "{v}");
                return v;
            }
        }
    }
}

/// A TCP proxy to `upstream` that drops the frames header from the first
/// request head of each connection (the WebSocket upgrade's, on its own
/// connection), as a server that does not know it would ignore it.
pub async fn stripping_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tokio::io::AsyncReadExt::read(&mut client, &mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let kept: String = text
                    .split_inclusive("\r\n")
                    .filter(|l| !l.to_ascii_lowercase().starts_with("x-subrosa-frames:"))
                    .collect();
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
                if tokio::io::AsyncWriteExt::write_all(&mut server, kept.as_bytes()).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    addr
}
