//! The first release's homes and server data (`tests/fixtures/v1`, see its
//! README), for the tests of what an upgrade keeps and what it moves.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::{copy_dir, parse_json_lines, stderr, texts, Server, User};

/// Every fixture home's passphrase.
pub const FIXTURE_PASS: &str = "fixture passphrase";

/// The fixtures' folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

/// A copy of the fixture home `kind/who`, pointed at `server` (the fixture
/// remembers a port of the run that made it).
pub fn home(kind: &str, who: &str, server: &Server) -> User {
    let user = User { name: who.into(), dir: tempfile::tempdir().expect("tempdir") };
    copy_dir(&fixtures().join(kind).join(who), &user.home());
    open_store(&user).write(|tx| tx.set_meta("server_url", server.url.as_bytes())).expect("point at the server");
    user
}

/// The store of a fixture home (it migrates on opening).
pub fn open_store(user: &User) -> subrosa_client::store::Store {
    <subrosa_client::store::Store as subrosa_client::store::OnDisk>::open(&user.home(), FIXTURE_PASS)
        .expect("the old store opens and migrates")
}

/// Runs `subrosa` as a fixture user.
pub fn output(user: &User, args: &[&str]) -> Output {
    user.cmd(args).env("SUBROSA_PASSPHRASE", FIXTURE_PASS).output().expect("subrosa runs")
}

/// Runs and asserts success; the standard output.
pub fn run(user: &User, args: &[&str]) -> String {
    let out = output(user, args);
    assert!(out.status.success(), "{} {args:?}: {}", user.name, stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `receive --json`, its texts.
pub fn received(user: &User) -> Vec<String> {
    texts(&parse_json_lines(&run(user, &["receive", "--json"])))
}
