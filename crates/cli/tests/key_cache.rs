//! The session key cache (crates/client/src/keycache.rs) through the real
//! binary: a command given the passphrase caches the derived store key in
//! the session's kernel keyring; the next ones open without it; a wrong
//! passphrase is refused all the same; `off`, expiry and `subrosa lock`
//! end it; a stale, planted or damaged entry falls back to the passphrase.
//!
//! The test process and the `subrosa` processes it runs share one session
//! keyring. Where the kernel keyring is unavailable (a container whose
//! seccomp policy refuses keyctl) every test here says so and skips.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;
use subrosa_client::keycache::{CachePolicy, KeyCache};

/// Short, so that whatever a failed test leaves in the keyring goes soon.
const TTL: &str = "120";

fn keyring_or_skip(test: &str) -> bool {
    if subrosa_client::keycache::available() {
        return true;
    }
    eprintln!("SKIPPED {test}: the kernel session keyring is not available here (keyctl refused)");
    false
}

/// A command with the cache on and the passphrase given.
fn with_pass(u: &User, args: &[&str]) -> Output {
    u.cmd(args).env("SUBROSA_KEY_CACHE", TTL).output().expect("runs")
}

/// A command with the cache on and no passphrase (nor a terminal to ask on).
fn without_pass(u: &User, args: &[&str]) -> Output {
    u.cmd(args).env("SUBROSA_KEY_CACHE", TTL).env_remove("SUBROSA_PASSPHRASE").output().expect("runs")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

fn cache_of(u: &User) -> KeyCache {
    KeyCache::for_home(&u.home(), CachePolicy::parse(TTL).expect("policy"))
}

#[test]
fn a_cached_key_opens_without_the_passphrase_until_locked() {
    if !keyring_or_skip("a_cached_key_opens_without_the_passphrase_until_locked") {
        return;
    }
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");

    // The harness runs with the cache off: nothing was cached.
    alice.send("bob", "first");
    assert_clean_error(&without_pass(&alice, &["contacts"]), "SUBROSA_PASSPHRASE");

    // One command with the passphrase caches the key; the next need none.
    assert_ok(&with_pass(&alice, &["contacts"]), "contacts with the passphrase");
    let out = without_pass(&alice, &["send", "bob", "second"]);
    assert_ok(&out, "send from the cached key");
    assert!(String::from_utf8_lossy(&out.stdout).contains("sent"), "{}", String::from_utf8_lossy(&out.stdout));

    // A wrong passphrase is refused although a key is cached, and the
    // cached key stays (a typo does not lock the session).
    let out = alice.cmd(&["history", "bob"]).env("SUBROSA_KEY_CACHE", TTL).env("SUBROSA_PASSPHRASE", "wrong").output();
    assert_clean_error(&out.expect("runs"), "wrong passphrase");
    assert_ok(&without_pass(&alice, &["contacts"]), "still cached after a wrong passphrase");
    // The right one is accepted from the cache's check value.
    assert_ok(&with_pass(&alice, &["contacts"]), "the right passphrase with a key cached");

    // `off` does not use the cached key either.
    let out = alice.cmd(&["contacts"]).env("SUBROSA_KEY_CACHE", "off").env_remove("SUBROSA_PASSPHRASE").output();
    assert_clean_error(&out.expect("runs"), "SUBROSA_PASSPHRASE");

    // `lock` drops it: the passphrase is needed again.
    let out = alice.cmd(&["lock"]).env_remove("SUBROSA_PASSPHRASE").output().expect("runs");
    assert_ok(&out, "lock");
    assert!(String::from_utf8_lossy(&out.stdout).contains("locked"));
    assert_clean_error(&without_pass(&alice, &["contacts"]), "SUBROSA_PASSPHRASE");
    let out = alice.cmd(&["lock"]).env_remove("SUBROSA_PASSPHRASE").output().expect("runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to lock"));

    // Nothing was lost on the way.
    assert_eq!(texts(&bob.receive_json(&[])), ["first", "second"]);
    assert_eq!(texts(&alice.history_json("bob")), ["first", "second"]);
}

#[test]
fn a_cached_key_expires() {
    if !keyring_or_skip("a_cached_key_expires") {
        return;
    }
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let out = alice.cmd(&["contacts"]).env("SUBROSA_KEY_CACHE", "1s").output().expect("runs");
    assert_ok(&out, "contacts caching for one second");
    assert!(cache_of(&alice).name().is_some());
    // The kernel drops it after its lifetime (not renewed by use).
    std::thread::sleep(Duration::from_millis(2500));
    assert_clean_error(&without_pass(&alice, &["contacts"]), "SUBROSA_PASSPHRASE");
}

#[test]
fn a_stale_planted_or_damaged_entry_falls_back_to_the_passphrase() {
    if !keyring_or_skip("a_stale_planted_or_damaged_entry_falls_back_to_the_passphrase") {
        return;
    }
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "before");
    let cache = cache_of(&alice);

    // A key that does not open the store, with a check value that admits
    // the right passphrase: the store is opened by deriving, and the entry
    // replaced by the right key.
    cache.plant(&[0x42; 32], PASS);
    assert_ok(&with_pass(&alice, &["send", "bob", "after a stale key"]), "send over a stale key");
    assert_ok(&without_pass(&alice, &["contacts"]), "the entry now holds the right key");

    // Without a passphrase, a wrong key is dropped and the passphrase asked for.
    cache.plant(&[0x43; 32], PASS);
    assert_clean_error(&without_pass(&alice, &["contacts"]), "SUBROSA_PASSPHRASE");
    assert_clean_error(&without_pass(&alice, &["contacts"]), "SUBROSA_PASSPHRASE");

    // A damaged entry reads as nothing cached.
    for junk in [&b"x"[..], b"SRK1", &[0u8; 100][..], &[0xff; 68][..]] {
        cache.plant_raw(junk);
        assert_clean_error(&without_pass(&alice, &["contacts"]), "SUBROSA_PASSPHRASE");
        cache.plant_raw(junk);
        assert_ok(&with_pass(&alice, &["contacts"]), "contacts over a damaged entry");
    }

    // A wrong passphrase over a planted entry that admits it is still
    // refused: the planted key does not open the store.
    cache.plant(&[0x44; 32], "wrong");
    let out = alice.cmd(&["contacts"]).env("SUBROSA_KEY_CACHE", TTL).env("SUBROSA_PASSPHRASE", "wrong").output();
    assert_clean_error(&out.expect("runs"), "wrong passphrase");

    cache.forget();
    assert_eq!(texts(&bob.receive_json(&[])), ["before", "after a stale key"]);
}
