//! People already use Subrosa: homes and server data made by the first
//! release (`tests/fixtures/v1`, see its README) migrate in place and keep
//! working, on SQLite and on PostgreSQL. Undelivered mail the old server
//! held is delivered; conversations made before go on both ways.

mod common;

use common::v1::*;
use common::*;

#[test]
fn a_first_release_sqlite_server_and_its_users_upgrade_in_place() {
    let server = Server::start_on_copy_of(&fixtures().join("sqlite/server"), &[]);
    let (alice, bob, carol) =
        (home("sqlite", "alice", &server), home("sqlite", "bob", &server), home("sqlite", "carol", &server));

    // What the old server still held for alice arrives.
    assert!(received(&alice).contains(&"queued for alice, undelivered".to_string()));
    // History made by the old client is still there.
    let history = parse_json_lines(&run(&alice, &["history", "@bob", "--json"]));
    assert!(texts(&history).contains(&"hello bob, from the v1 fixture".to_string()), "{history:?}");

    // The old 1:1 conversation and the old group go on, both ways.
    run(&alice, &["send", "@bob", "after the upgrade"]);
    assert!(received(&bob).contains(&"after the upgrade".to_string()));
    run(&bob, &["send", "@alice", "bob after the upgrade"]);
    assert!(received(&alice).contains(&"bob after the upgrade".to_string()));
    run(&carol, &["send", "friends", "carol in the old group"]);
    for u in [&alice, &bob] {
        assert!(received(u).contains(&"carol in the old group".to_string()), "{}", u.name);
    }
    // A new user meets the old ones.
    let dave = User::register(&server, "dave");
    dave.send("alice", "hello from a new account");
    assert!(received(&alice).contains(&"hello from a new account".to_string()));
}

#[test]
fn a_first_release_postgres_database_and_its_users_upgrade_in_place() {
    let Some(url) = std::env::var("SUBROSA_TEST_POSTGRES").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipped: SUBROSA_TEST_POSTGRES is not set");
        return;
    };
    // The dump made by the first release, restored into a schema of its own.
    let schema = format!("upgrade_{}", rand_token());
    let dump = std::fs::read_to_string(fixtures().join("postgres/server.sql")).expect("dump");
    let dump = dump.replace("fixture_v1", &schema);
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    };
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), dump).expect("write dump");
    let out = std::process::Command::new("psql")
        .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-q", "-f"])
        .arg(file.path())
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "restoring the dump: {}", String::from_utf8_lossy(&out.stderr));

    let sep = if url.contains('?') { '&' } else { '?' };
    let db = format!("{url}{sep}options=-csearch_path%3D{schema}");
    let server = Server::start_with(&["--database", &db]);
    let (alice, bob) = (home("postgres", "alice", &server), home("postgres", "bob", &server));
    assert!(received(&alice).contains(&"queued for alice".to_string()));
    run(&alice, &["send", "@bob", "after the upgrade"]);
    assert!(received(&bob).contains(&"after the upgrade".to_string()));
    run(&bob, &["send", "@alice", "bob after the upgrade"]);
    assert!(received(&alice).contains(&"bob after the upgrade".to_string()));
    drop(server);
    psql(&format!("DROP SCHEMA {schema} CASCADE"));
}
