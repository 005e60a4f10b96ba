//! Revocation is real: removing a device rotates the account's identity key
//! for the devices that remain, so the removed (stolen) device's copy of the
//! old key certifies nothing that peers or the account's own monitoring
//! accept, while the remaining devices carry on under the new key.

mod common;

use common::*;

/// Links a new device of `handle`, approved on `existing`.
fn link(server: &Server, existing: &User, name: &str, handle: &str) -> User {
    let new = User { name: name.into(), dir: tempfile::tempdir().expect("tempdir") };
    let (link, code) = start_link(server, &new, handle, &[]);
    existing.ok(&["link", "--accept", &code]);
    let out = link.wait_with_output().expect("link ends");
    assert!(out.status.success(), "{}", stderr(&out));
    new
}

/// The device's identity as a thief with its disk and passphrase holds it.
fn identity_of(user: &User) -> subrosa_core::DeviceIdentity {
    let me = subrosa_client::Subrosa::open(&user.home(), PASS).expect("open the stolen store");
    (*me.identity()).clone()
}

#[test]
fn removing_a_device_rotates_the_identity_key_and_the_old_key_certifies_nothing() {
    let server = Server::start_malicious();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    assert_eq!(texts(&bob.receive_json(&[])), ["hello"]);
    let alice2 = link(&server, &alice, "alice2", "alice");
    let stolen = link(&server, &alice, "stolen", "alice");
    for d in [&alice2, &stolen] {
        d.receive_json(&[]);
    }
    bob.receive_json(&[]);
    let number_before = bob.ok(&["safety-number", "alice"]);
    let thief = identity_of(&stolen);
    let old_key = thief.identity_public().to_vec();

    // alice removes the stolen device: revoked, removed, and the identity
    // key rotated for alice and alice2.
    let out = alice.ok(&["devices", "remove", &thief.device_id().to_hex()]);
    assert!(out.contains("removed device"), "{out}");
    assert_ne!(identity_of(&alice).identity_public(), old_key.as_slice(), "alice's device holds a new key");

    // bob sees a key change and a new safety number, and reads on.
    alice.send("bob", "after the removal");
    let got = texts(&bob.receive_json(&[]));
    assert!(got.iter().any(|t| t.contains("alice's identity key changed")), "{got:?}");
    assert!(got.contains(&"after the removal".to_string()), "{got:?}");
    let number_after = bob.ok(&["safety-number", "alice"]);
    assert_ne!(number_before, number_after);

    // alice2 got the new key from alice, adopted it once the directory
    // listed it, and carries on: same safety number as alice, no alert,
    // and bob reads it without a warning.
    let out = alice2.run(&["receive"]);
    assert!(out.status.success() && !stderr(&out).contains("warning"), "{}", stderr(&out));
    assert_eq!(identity_of(&alice2).identity_public(), identity_of(&alice).identity_public());
    assert_eq!(alice2.ok(&["safety-number", "bob"]), alice.ok(&["safety-number", "bob"]));
    alice2.send("bob", "from the second device");
    let out = bob.run(&["receive", "--json"]);
    assert!(out.status.success() && !stderr(&out).contains("warning"), "{}", stderr(&out));
    let got = texts(&parse_json_lines(&String::from_utf8_lossy(&out.stdout)));
    assert!(got.contains(&"from the second device".to_string()), "{got:?}");
    assert!(!got.iter().any(|t| t.contains("warning")), "{got:?}");
    for d in [&alice, &alice2] {
        let devices = d.ok(&["devices"]);
        assert_eq!(devices.lines().count(), 2, "{devices}");
        assert!(!devices.contains("NOT CERTIFIED"), "{devices}");
    }

    // The stolen device can no longer reach the server at all.
    assert!(!stolen.run(&["receive"]).status.success());

    // Its copy of the old identity key certifies a device, and the operator
    // publishes it in alice's entry: alice's devices notice, and carol
    // refuses to start a conversation with an entry holding it.
    let (ghost, _) = fake_device("alice");
    let key = mls_rs::crypto::SignaturePublicKey::new(ghost.device_public().to_vec());
    let cert = thief.certify(&subrosa_core::default_crypto(), ghost.device_id(), &key, 1).expect("certify");
    let record = subrosa_proto::DeviceRecord {
        device_id: ghost.device_id(),
        signature_key: subrosa_proto::B64(ghost.device_public().to_vec()),
        certificate: subrosa_proto::B64(cert.to_bytes().expect("bytes")),
    };
    server.attack(serde_json::json!({ "ghost_device": { "handle": "alice", "device": record } }));
    for d in [&alice, &alice2] {
        let out = d.run(&["receive"]);
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "warning: the key directory lists a device {} for alice",
                ghost.device_id().to_hex()
            )),
            "{err}"
        );
    }
    let carol = User::register(&server, "carol");
    assert_clean_error(&carol.run(&["send", "alice", "to the ghost?"]), "not certified by their identity key");
}
