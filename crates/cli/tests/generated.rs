//! `subrosa completions SHELL` and `subrosa man`: generated from the clap
//! definitions, printed to standard output, needing no home or server.

#![allow(clippy::expect_used)]

mod common;

fn run(args: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().expect("tempdir");
    std::process::Command::new(common::subrosa_bin())
        .args(args)
        // A home that does not exist: these commands must not need one.
        .env("SUBROSA_HOME", home.path().join("none"))
        .env_remove("SUBROSA_PASSPHRASE")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("subrosa runs")
}

#[test]
fn completions_and_the_man_page_come_from_the_commands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).expect("utf-8");
        assert!(text.contains("send") && text.contains("daemon"), "{shell}: {text}");
    }
    let out = run(&["man"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = String::from_utf8(out.stdout).expect("utf-8");
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "not roff: {page:.200}");
    assert!(page.contains(".TH subrosa") && page.contains("send"), "{page}");

    // An unknown shell: a one-line error, not a panic.
    let out = run(&["completions", "cmd.exe"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"), "{out:?}");
}
