//! The running client cannot leave a core dump (which would hold the store
//! key and decrypted messages): its core-size limit is 0 from the start.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{wait_until, Server, User};

#[cfg(target_os = "linux")]
#[test]
fn a_running_client_has_core_dumps_off() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let mut follow = alice
        .cmd(&["receive", "--follow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("follow starts");
    let limits = format!("/proc/{}/limits", follow.id());
    let mut line = String::new();
    let found = wait_until(Duration::from_secs(10), || {
        line = std::fs::read_to_string(&limits)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap_or_default()
            .to_string();
        line.split_whitespace().skip(4).take(2).all(|v| v == "0") && !line.is_empty()
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(found, "core dumps still allowed: {line:?}");
}
