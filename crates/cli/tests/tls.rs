//! The server terminates TLS itself; clients verify it against a CA they
//! were told to trust, over HTTPS and WSS.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn messages_flow_over_tls_and_an_untrusted_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Subrosa test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let (cert_path, key_path, ca_path) =
        (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ca.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    std::fs::write(&ca_path, ca.pem()).expect("write");

    let mut server = Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server starts");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout"));
    let mut first = String::new();
    lines.read_line(&mut first).expect("address line");
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink);
    });
    let url = first.trim().strip_prefix("listening on ").expect("listening line").replace("127.0.0.1", "localhost");
    assert!(url.starts_with("https://localhost:"), "{url}");

    let user = |name: &str| {
        let u = User { name: name.into(), dir: tempfile::tempdir().expect("tempdir") };
        let out = u.cmd(&["register", name, "--server", &url]).env("SUBROSA_CA_CERT", &ca_path).output().expect("runs");
        assert!(out.status.success(), "{}", stderr(&out));
        u
    };
    let alice = user("alice");
    let bob = user("bob");
    let run = |u: &User, args: &[&str]| {
        let out = u.cmd(args).env("SUBROSA_CA_CERT", &ca_path).output().expect("runs");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&alice, &["send", "bob", "over TLS"]);
    assert_eq!(texts(&parse_json_lines(&run(&bob, &["receive", "--json"]))), ["over TLS"]);

    // The WebSocket (wss) path: bob waits, alice sends.
    let waiting = bob
        .cmd(&["receive", "--json", "--timeout", "20"])
        .env("SUBROSA_CA_CERT", &ca_path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(700));
    run(&alice, &["send", "bob", "pushed over wss"]);
    let out = waiting.wait_with_output().expect("ends");
    assert!(out.status.success());
    assert_eq!(texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout))), ["pushed over wss"]);

    // Without the CA the certificate is not trusted: a clear error.
    let carol = User { name: "carol".into(), dir: tempfile::tempdir().expect("tempdir") };
    let out = carol.cmd(&["register", "carol", "--server", &url]).env_remove("SUBROSA_CA_CERT").output().expect("runs");
    assert_clean_error(&out, "network");
    let _ = server.kill();
    let _ = server.wait();
}
