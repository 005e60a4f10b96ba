//! The README's first command: `subrosa demo` runs on the embedded default
//! and reports what the server kept and fetched.

mod common;

#[test]
fn the_demo_runs_and_shows_the_server_kept_and_fetched_nothing() {
    let out = std::process::Command::new(common::subrosa_bin())
        .arg("demo")
        .env_remove("SUBROSA_HOME")
        .env_remove("SUBROSA_PASSPHRASE")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", common::stderr(&out));
    assert!(text.contains("MLS Welcome") && text.contains("MLS application message"), "{text}");
    assert!(text.contains("does the link or the text appear anywhere in the server's files? no"), "{text}");
    assert!(text.contains("bob receives   alice: Hi Bob! The plan is here: http://127.0.0.1:"), "{text}");
    assert!(text.contains("After delivery the server keeps: 0 messages, 0 inbox rows."), "{text}");
    assert!(text.contains("Visits to the link: 0."), "{text}");
}
