//! The attack server starts like `subrosa-server`, prints its address, and
//! is honest while its plan is missing or unreadable.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[test]
fn starts_and_serves_the_directory_with_or_without_a_plan() {
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_subrosa-attack-server"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let addr = line.trim().strip_prefix("listening on http://").expect("listening line").to_owned();

    let honest = get(&addr, "/v1/kt/head");
    assert!(honest.starts_with("HTTP/1.1 200"), "{honest}");
    assert!(honest.contains("\"vrf_public_key\""), "{honest}");
    // The VRF key was created at start and persisted in the database.
    std::fs::write(dir.path().join("attacks.json"), "{ not json").expect("plan");
    let garbled = get(&addr, "/v1/kt/head");
    assert!(garbled.starts_with("HTTP/1.1 200"), "an unreadable plan is honest: {garbled}");
    std::fs::write(dir.path().join("attacks.json"), r#"{"messages": {"replay": true}}"#).expect("plan");
    assert!(get(&addr, "/v1/kt/audit?from=0&to=1").starts_with("HTTP/1.1 400"));
    child.kill().expect("kill");
    let _ = child.wait();
}
