//! Group conversations end to end: the built binaries, a real server
//! process, several users in temporary directories.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;

use common::*;

fn members(u: &User, group: &str) -> Vec<String> {
    let mut v: Vec<String> = u
        .ok(&["members", group])
        .lines()
        .filter(|l| !l.starts_with("ciphersuite\t"))
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Non-system texts grouped by sender, in the order received.
fn by_sender(msgs: &[serde_json::Value]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for x in msgs.iter().filter(|x| x["system"] == false) {
        m.entry(x["from"].as_str().unwrap_or_default().into())
            .or_default()
            .push(x["text"].as_str().unwrap_or_default().into());
    }
    m
}

fn system_lines(msgs: &[serde_json::Value]) -> Vec<String> {
    msgs.iter().filter(|x| x["system"] == true).map(|x| x["text"].as_str().unwrap_or_default().to_string()).collect()
}

#[test]
fn three_users_talk_rename_add_and_a_removed_member_is_locked_out() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    let dave = User::register(&server, "dave");

    alice.ok(&["group", "create", "friends", "bob", "carol"]);
    // Each member sends a few; everyone else receives everything, in order per sender.
    for round in 0..3 {
        for u in [&alice, &bob, &carol] {
            u.send("friends", &format!("{} says {round}", u.name));
        }
    }
    for u in [&alice, &bob, &carol] {
        let got = u.receive_json(&[]);
        let senders = by_sender(&got);
        for other in [&alice, &bob, &carol] {
            let expected: Vec<String> = (0..3).map(|r| format!("{} says {r}", other.name)).collect();
            if other.name == u.name {
                assert!(!senders.contains_key(&u.name), "{} got its own messages back", u.name);
            } else {
                assert_eq!(senders.get(&other.name), Some(&expected), "{} from {}", u.name, other.name);
            }
        }
        assert!(got.iter().all(|m| m["target"] == "friends" && m["group"] == true));
    }
    assert_eq!(members(&alice, "friends"), ["alice", "bob", "carol"]);

    // Rename and add travel inside the encryption; every member sees them.
    bob.ok(&["group", "rename", "friends", "the plotters"]);
    carol.ok(&["group", "add", "the plotters", "dave"]);
    let lines = system_lines(&alice.receive_json(&[]));
    assert!(lines.contains(&"bob renamed the group to the plotters".to_string()), "{lines:?}");
    assert!(lines.contains(&"carol added dave".to_string()), "{lines:?}");
    // bob's own change was shown when he made it; the next receive shows carol's.
    assert_eq!(system_lines(&bob.receive_json(&[])), ["carol added dave"]);
    assert!(
        system_lines(&bob.history_json("the plotters")).contains(&"you renamed the group to the plotters".to_string())
    );
    let lines = system_lines(&dave.receive_json(&[]));
    assert_eq!(lines, ["carol added you to the plotters"]);
    assert_eq!(members(&dave, "the plotters"), ["alice", "bob", "carol", "dave"]);
    assert!(dave.ok(&["groups"]).starts_with("the plotters\talice, bob, carol, dave\t"));
    // The server saw neither name.
    for needle in [b"the plotters".as_slice(), b"friends"] {
        assert!(files_containing(&server.data_dir(), needle).is_empty());
    }

    // alice removes carol.
    alice.ok(&["group", "remove", "the plotters", "carol"]);
    let lines = system_lines(&carol.receive_json(&[]));
    assert_eq!(lines.last().map(String::as_str), Some("alice removed you"), "{lines:?}");
    let out = carol.run(&["send", "the plotters", "let me back in"]);
    assert_clean_error(&out, "no longer a member");
    for u in [&bob, &dave] {
        assert!(system_lines(&u.receive_json(&[])).contains(&"alice removed carol".to_string()));
    }
    bob.send("the plotters", "carol must not read this");
    // Nothing sent after the removal is addressed to carol…
    assert!(carol.receive_json(&[]).is_empty());
    // …and if the server delivered it anyway, she could not decrypt it.
    {
        let db = server.db();
        let carol_device: i64 =
            db.query_row("SELECT id FROM devices WHERE handle = 'carol'", [], |r| r.get(0)).expect("carol's device");
        let msg: i64 = db.query_row("SELECT max(id) FROM messages", [], |r| r.get(0)).expect("bob's message");
        db.execute("INSERT INTO inbox (device, message, created_at) VALUES (?1, ?2, 0)", [carol_device, msg])
            .expect("forge");
    }
    let out = carol.run(&["receive", "--json"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("must not read"));
    assert!(stderr(&out).contains("dropped"), "{}", stderr(&out));
    assert_eq!(by_sender(&dave.receive_json(&[])).get("bob"), Some(&vec!["carol must not read this".to_string()]));
    assert_eq!(by_sender(&alice.receive_json(&[])).get("bob"), Some(&vec!["carol must not read this".to_string()]));

    // dave leaves; the next member online commits it.
    dave.ok(&["group", "leave", "the plotters"]);
    assert!(dave.ok(&["groups"]).contains("(left)"));
    assert!(system_lines(&bob.receive_json(&[])).contains(&"dave left".to_string()));
    assert!(system_lines(&alice.receive_json(&[])).contains(&"dave left".to_string()));
    assert_eq!(members(&alice, "the plotters"), ["alice", "bob"]);
    assert_eq!(members(&bob, "the plotters"), ["alice", "bob"]);

    // History keeps it all, own messages and system lines included.
    let h = alice.history_json("the plotters");
    assert!(h.iter().any(|m| m["text"] == "alice says 0" && m["outgoing"] == true));
    assert!(h.iter().any(|m| m["text"] == "you removed carol" && m["system"] == true));
}

#[test]
fn concurrent_commits_converge_and_no_message_is_lost() {
    let server = Server::start();
    let users: Vec<User> =
        ["alice", "bob", "carol", "dave", "erin", "frank"].iter().map(|n| User::register(&server, n)).collect();
    let (alice, bob, carol) = (&users[0], &users[1], &users[2]);
    alice.ok(&["group", "create", "race", "bob", "carol"]);
    bob.receive_json(&[]);
    carol.receive_json(&[]);

    // Rounds of simultaneous membership changes and messages by different members.
    let plan: [(&User, [&str; 2], &User, [&str; 2]); 3] = [
        (alice, ["add", "dave"], bob, ["add", "erin"]),
        (bob, ["rename", "race 2"], carol, ["add", "frank"]),
        (carol, ["remove", "dave"], alice, ["rename", "race 3"]),
    ];
    let mut group = "race".to_string();
    for (round, (a, a_args, b, b_args)) in plan.into_iter().enumerate() {
        let spawn = |u: &User, args: [&str; 2]| {
            let mut full = vec!["group", args[0], group.as_str(), args[1]];
            if args[0] == "rename" {
                full = vec!["group", "rename", group.as_str(), args[1]];
            }
            u.cmd(&full).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn")
        };
        let pa = spawn(a, a_args);
        let pb = spawn(b, b_args);
        let sender = carol
            .cmd(&["send", group.as_str(), &format!("during round {round}")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        for p in [pa, pb] {
            let out = p.wait_with_output().expect("ends");
            assert!(out.status.success(), "round {round}: {}", stderr(&out));
        }
        // carol's send may run while her own change of the group (another
        // process of the same device) waits for the server: then it is held
        // back and queued (exit 75), and her next command sends it, once.
        let out = sender.wait_with_output().expect("ends");
        assert!(out.status.success() || exit_code(&out) == 75, "round {round}: {}", stderr(&out));
        if exit_code(&out) == 75 {
            carol.ok(&["receive"]);
        }
        if a_args[0] == "rename" {
            group = a_args[1].to_string();
        }
        if b_args[0] == "rename" {
            group = b_args[1].to_string();
        }
    }
    eprintln!("commits refused as stale and retried: {}", server.log().matches("status=409").count());
    // Everyone still in catches up, and all agree on one state.
    let still_in = [alice, bob, carol, &users[4], &users[5]];
    let mut received: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in still_in {
        let got = u.receive_json(&[]);
        received.insert(u.name.clone(), by_sender(&got).get("carol").cloned().unwrap_or_default());
    }
    let reference = members(alice, "race 3");
    assert_eq!(reference, ["alice", "bob", "carol", "erin", "frank"]);
    for u in still_in {
        assert_eq!(members(u, "race 3"), reference, "{} disagrees", u.name);
    }
    // Every message carol sent reached every member who was in the group when she sent it.
    for name in ["alice", "bob"] {
        assert_eq!(received[name], ["during round 0", "during round 1", "during round 2"], "{name}");
    }
    // After it all, a message reaches everyone.
    alice.send("race 3", "still one group");
    for u in [bob, carol, &users[4], &users[5]] {
        assert_eq!(
            by_sender(&u.receive_json(&[])).get("alice"),
            Some(&vec!["still one group".to_string()]),
            "{}",
            u.name
        );
    }
}

#[test]
fn bad_group_input_gets_clear_errors_and_loses_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let _bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "club", "bob"]);
    alice.send("club", "kept");

    assert_clean_error(&alice.run(&["group", "add", "no such group", "carol"]), "unknown group");
    assert_clean_error(&alice.run(&["group", "add", "club", "nobody"]), "unknown handle nobody");
    assert_clean_error(&alice.run(&["group", "add", "club", "bob"]), "already a member");
    assert_clean_error(&alice.run(&["group", "remove", "club", "carol"]), "not a member");
    assert_clean_error(&alice.run(&["group", "remove", "club", "alice"]), "group leave");
    assert_clean_error(&alice.run(&["group", "create", "club", "carol"]), "already have a group");
    assert_clean_error(&alice.run(&["group", "create", "", "carol"]), "invalid group name");
    assert_clean_error(&alice.run(&["group", "create", "solo", "alice"]), "name the others");
    assert_clean_error(&alice.run(&["group", "create", "x", "nobody"]), "unknown handle");
    assert_clean_error(&alice.run(&["group", "rename", "nothing", "y"]), "unknown group");
    assert_clean_error(&alice.run(&["group", "leave", "nothing"]), "unknown group");
    assert_clean_error(&alice.run(&["members", "nothing-here"]), "unknown conversation");
    assert_clean_error(&carol.run(&["send", "club", "hi"]), "unknown handle club");
    assert_clean_error(&alice.run(&["group", "create"]), "required");

    assert_eq!(texts(&alice.history_json("club")).last().map(String::as_str), Some("kept"));
    assert_eq!(members(&alice, "club"), ["alice", "bob"]);
}
