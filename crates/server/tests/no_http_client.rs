//! "The server cannot fetch a link": its dependency tree holds no outbound
//! HTTP client. Anyone can check this with `cargo tree`; this test does.
//!
//! Known and accepted: axum's `ws` feature turns on tokio-tungstenite's
//! default `connect` feature (a plain `ws://` connect helper). With no TLS
//! feature it cannot reach an `https` link, and the server never calls it;
//! the test pins that no TLS feature appears there.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Command;

fn cargo_tree(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", "subrosa-server"])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn server_dependency_tree_has_no_http_client() {
    let tree = cargo_tree(&["-e", "normal", "--prefix", "none"]);
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains(&"axum") && crates.contains(&"hyper"), "unexpected tree:\n{tree}");
    for client in ["reqwest", "ureq", "isahc", "surf", "attohttpc", "curl", "hyper-rustls", "hyper-tls", "awc"] {
        assert!(!crates.contains(&client), "{client} is in the server's dependency tree");
    }
    assert!(!crates.iter().any(|c| c.starts_with("curl")), "a curl binding is in the tree");
}

#[test]
fn hyper_is_built_without_client_features() {
    let features = cargo_tree(&["-e", "normal,features", "--prefix", "none"]);
    let enabled: Vec<&str> = features.lines().map(|l| l.trim_end_matches(" (*)")).collect();
    assert!(enabled.contains(&"hyper feature \"server\""), "unexpected output:\n{features}");
    for line in &enabled {
        let is_hyper = line.starts_with("hyper feature") || line.starts_with("hyper-util feature");
        assert!(!(is_hyper && line.contains("client")), "{line} is enabled for the server");
        let is_ws = line.starts_with("tokio-tungstenite feature") || line.starts_with("tungstenite feature");
        assert!(!(is_ws && (line.contains("tls") || line.contains("rustls"))), "{line} is enabled for the server");
    }
}
