//! The `subrosa-server` binary: its ready line, signals and argument errors.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

fn get_health(addr: &str) -> String {
    get(addr, "/v1/health")
}

/// Starts the binary over `data` with `args` (stderr as given) and reads its
/// ready line: the process, the rest of its stdout, and the address.
fn spawn(data: &std::path::Path, args: &[&str], log: &str, stderr: Stdio) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(args)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("bad ready line {line:?}"))
        .to_owned();
    (child, stdout, addr)
}

#[cfg(unix)]
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok);
}

#[cfg(unix)]
#[test]
fn prints_ready_line_serves_and_stops_on_signals() {
    for sig in ["-TERM", "-INT"] {
        let dir = tempfile::tempdir().expect("dir");
        let data = dir.path().join("new").join("data");
        let args = ["--message-ttl", "2s", "--rate-limit", "50", "--max-recipients", "10"];
        let (mut child, mut stdout, addr) = spawn(&data, &args, "warn", Stdio::piped());
        assert!(!addr.ends_with(":0"), "{addr}");
        let answer = get_health(&addr);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("{\"status\":\"ok\"}"), "{answer}");
        assert!(data.join("server.db").exists(), "the data directory and database are created");

        signal(child.id(), sig);
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit after {sig}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{sig}: {status:?}");
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).expect("stdout");
        assert_eq!(rest, "", "exactly one line on stdout");
    }
}

fn run_failing(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_exit_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("d");
    let data = data.to_str().expect("utf-8");
    for args in [
        vec!["--listen", "not-an-address"],
        vec!["--message-ttl", "soon", "--data", data],
        vec!["--max-recipients", "0", "--data", data],
        vec!["--tls-cert", "x.pem", "--data", data],
        vec!["--db-pool-size", "8", "--data", data],
        vec!["--db-pool-size", "0", "--data", data],
        vec!["--db-batch-workers", "-1", "--data", data],
        vec!["--no-such-flag"],
    ] {
        let (code, stdout, stderr) = run_failing(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stdout, "");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let not_a_dir = file.join("data");
    let (code, stdout, stderr) =
        run_failing(&["--listen", "127.0.0.1:0", "--data", not_a_dir.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("data directory"), "{stderr}");

    let (code, _, stderr) =
        run_failing(&["--listen", "127.0.0.1:0", "--data", data, "--database", "postgres://x@127.0.0.1:1/x"]);
    assert_eq!(code, 1);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("database: storage unavailable"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").to_string();
    let (code, _, stderr) = run_failing(&["--listen", &port, "--data", data]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot listen"), "{stderr}");
}

/// Starts the server with `args`, asks for health, stops it with SIGTERM
/// and returns what it logged.
#[cfg(unix)]
fn logs_of(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, _stdout, addr) = spawn(dir.path(), args, "info", Stdio::piped());
    assert!(get_health(&addr).starts_with("HTTP/1.1 200"));
    signal(child.id(), "-TERM");
    let mut logs = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut logs).expect("logs");
    child.wait().expect("exit");
    logs
}

#[cfg(unix)]
#[test]
fn logs_carry_no_colour_codes_off_a_terminal_and_are_json_on_request() {
    let text = logs_of(&[]);
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a log file: {text:?}");

    let json = logs_of(&["--log-format", "json"]);
    let lines: Vec<&str> = json.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{json}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
}

/// One plain HTTP/1.1 GET; the whole answer.
fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[cfg(unix)]
#[test]
fn metrics_are_served_on_their_own_address_and_name_nobody() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, mut stdout, addr) = spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"], "warn", Stdio::null());
    let mut second = String::new();
    stdout.read_line(&mut second).expect("metrics line");
    let metrics = second
        .trim()
        .strip_prefix("metrics on http://")
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line: {second:?}"))
        .to_owned();
    assert_ne!(metrics, addr, "metrics never share the public address");

    assert!(get(&addr, "/v1/health").starts_with("HTTP/1.1 200"));
    assert!(get(&addr, "/v1/accounts/secret-handle").starts_with("HTTP/1.1 401"));
    // The public address does not serve them.
    assert!(get(&addr, "/metrics").starts_with("HTTP/1.1 404"));

    let scrape = get(&metrics, "/metrics");
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("text/plain; version=0.0.4"), "{scrape}");
    let count = |name: &str| -> u64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing: {scrape}"))
    };
    assert!(count("subrosa_requests_total{class=\"2xx\"}") >= 1);
    assert!(count("subrosa_requests_total{class=\"4xx\"}") >= 2);
    assert_eq!(count("subrosa_inbox_rows"), 0);
    assert!(count("subrosa_request_seconds_count{op=\"other\"}") >= 3);
    assert!(!scrape.contains("secret-handle"), "a handle reached the metrics: {scrape}");
    assert!(!scrape.contains("127.0.0.1"), "an address reached the metrics");
    signal(child.id(), "-TERM");
    child.wait().expect("exit");
}
