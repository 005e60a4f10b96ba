//! Safety numbers and verification, end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

#[test]
fn safety_numbers_match_on_both_sides_stay_stable_across_a_link_and_verify_marks_the_contact() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hi");
    bob.receive_json(&[]);

    let a = alice.ok(&["safety-number", "bob"]);
    let b = bob.ok(&["safety-number", "alice"]);
    assert_eq!(a, b);
    let groups: Vec<&str> = a.trim().split(' ').collect();
    assert_eq!(groups.len(), 12);
    assert!(groups.iter().all(|g| g.len() == 5 && g.chars().all(|c| c.is_ascii_digit())));

    // A second device of bob's: same account identity key, same number.
    let bob2 = User { name: "bob2".into(), dir: tempfile::tempdir().expect("tempdir") };
    let mut link = bob2
        .cmd(&["link", "bob", "--server", &server.url, "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(link.stdout.take().expect("stdout")).read_line(&mut line).expect("code");
    let code = line.trim().trim_start_matches("code: ").to_string();
    bob.ok(&["link", "--accept", &code]);
    assert!(link.wait().expect("link ends").success());
    bob2.receive_json(&[]);
    assert_eq!(bob2.ok(&["safety-number", "alice"]), a);
    alice.receive_json(&[]);
    assert_eq!(alice.ok(&["safety-number", "bob"]), a);

    // Verification needs a confirmation; without a terminal, --yes.
    assert_clean_error(&alice.run(&["verify", "bob"]), "confirm with --yes");
    assert!(alice.ok(&["contacts"]).contains("bob\tunverified"));
    assert!(alice.ok(&["history", "bob"]).starts_with("-- conversation with bob (not verified"));
    assert!(alice.ok(&["verify", "bob", "--yes"]).contains("bob is verified"));
    assert!(alice.ok(&["contacts"]).contains("bob\tverified"));
    assert!(alice.ok(&["history", "bob"]).starts_with("-- conversation with bob (verified)"));

    assert_clean_error(&alice.run(&["safety-number", "nobody"]), "unknown handle nobody");
    assert_clean_error(&alice.run(&["safety-number", "alice"]), "someone else");
    assert_clean_error(&alice.run(&["verify", "carol", "--yes"]), "unknown handle carol");
}
