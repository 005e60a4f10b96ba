//! Attachments end to end: the built `subrosa` against a real
//! `subrosa-server` process with real storage, in temporary directories.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

/// `len` bytes that never repeat a 16-byte run (a counter under a mixing
/// function): any window found in the server's files was copied from here.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i: u64 = 0;
    while out.len() < len {
        let mut x = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 29;
        out.extend_from_slice(&x.to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write the file to send");
    p
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether any 4 KiB window of `plain` appears in a file under `dir`:
/// every such window holds a whole 2 KiB block aligned in `plain`, so it is
/// enough to look for those blocks, found by their first 16 bytes.
fn leaked_window(dir: &Path, plain: &[u8]) -> Option<(PathBuf, usize)> {
    const BLOCK: usize = 2048;
    let mut heads: HashSet<[u8; 16]> = HashSet::new();
    let mut block_of = std::collections::HashMap::new();
    for (i, block) in plain.chunks_exact(BLOCK).enumerate() {
        let head: [u8; 16] = block[..16].try_into().expect("16 bytes");
        heads.insert(head);
        block_of.insert(head, i);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else { continue };
            for at in 0..bytes.len().saturating_sub(BLOCK) {
                let head: [u8; 16] = bytes[at..at + 16].try_into().expect("16 bytes");
                if heads.contains(&head) {
                    let i = block_of[&head];
                    if bytes[at..at + BLOCK] == plain[i * BLOCK..(i + 1) * BLOCK] {
                        return Some((p, at));
                    }
                }
            }
        }
    }
    None
}

fn attachments(m: &serde_json::Value) -> Vec<serde_json::Value> {
    m["attachments"].as_array().cloned().unwrap_or_default()
}

/// The one message with attachments among `msgs`.
fn the_attachment_message(msgs: &[serde_json::Value]) -> serde_json::Value {
    let with: Vec<_> = msgs.iter().filter(|m| !attachments(m).is_empty()).collect();
    assert_eq!(with.len(), 1, "one message with attachments expected in {msgs:?}");
    with[0].clone()
}

#[test]
fn a_30_mib_file_reaches_a_group_of_three_and_the_server_keeps_nothing() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let carol = User::register(&server, "carol");
    alice.ok(&["group", "create", "team", "bob", "carol"]);
    for u in [&bob, &carol] {
        u.ok(&["receive"]);
    }

    let token = rand_token();
    let name = format!("plans-{token:016x}.bin");
    let plain = noise(30 << 20, token);
    let file = write_file(alice.dir.path(), &name, &plain);
    let want = sha256_hex(&plain);
    alice.ok(&["send", "team", "the plans", "--attach", file.to_str().expect("utf-8 path")]);

    // The server holds the blob now: opaque, padded, and nameless.
    assert_eq!(server.count("blobs"), 1);
    assert!(files_containing(&server.data_dir(), name.as_bytes()).is_empty(), "the file name reached the server");
    assert_eq!(leaked_window(&server.data_dir(), &plain), None, "plaintext reached the server's files");

    // The sender's own history lists it (no path: it was never saved).
    let mine = the_attachment_message(&alice.history_json("team"));
    let a = &attachments(&mine)[0];
    assert_eq!(
        (a["name"].as_str(), a["size"].as_u64(), a["sha256"].as_str()),
        (Some(&*name), Some(30 << 20), Some(&*want))
    );

    for (i, u) in [&bob, &carol].into_iter().enumerate() {
        let downloads = u.dir.path().join("downloads");
        std::fs::create_dir(&downloads).expect("downloads dir");
        let got = u.receive_json(&["--downloads", downloads.to_str().expect("utf-8 path")]);
        let m = the_attachment_message(&got);
        assert_eq!(m["text"], "the plans");
        assert_eq!(m["from"], "alice");
        let a = &attachments(&m)[0];
        assert_eq!(a["name"].as_str(), Some(&*name));
        assert_eq!(a["size"].as_u64(), Some(30 << 20));
        assert_eq!(a["sha256"].as_str(), Some(&*want), "{} got another file", u.name);
        let saved = PathBuf::from(a["path"].as_str().expect("saved path"));
        assert_eq!(saved, downloads.join(&name));
        let bytes = std::fs::read(&saved).expect("saved file");
        assert_eq!(sha256_hex(&bytes), want);
        // The store keeps it encrypted: no plaintext in the home directory.
        assert_eq!(leaked_window(&u.home(), &plain), None, "{}'s store holds plaintext", u.name);
        // history --json lists it too, with where it was saved.
        let h = the_attachment_message(&u.history_json("team"));
        assert_eq!(attachments(&h)[0]["path"].as_str(), Some(saved.to_str().expect("utf-8")));
        if i == 0 {
            assert_eq!(server.count("blobs"), 1, "the blob went before every recipient fetched it");
        }
    }
    // Every recipient fetched it: gone, bytes and all.
    assert_eq!(server.count("blobs"), 0);
    assert_eq!(server.count("blob_pieces"), 0);
}

#[test]
fn a_tampered_blob_is_refused_and_nothing_is_saved() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    bob.ok(&["receive"]);
    let plain = noise(300_000, 7);
    let file = write_file(alice.dir.path(), "report.pdf", &plain);
    alice.ok(&["send", "bob", "--attach", file.to_str().expect("utf-8 path")]);

    // The operator flips one bit of the stored blob.
    let db = server.db();
    let (id, data): (i64, Vec<u8>) = db
        .query_row("SELECT id, data FROM blob_pieces ORDER BY start LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("a stored piece");
    let mut data = data;
    data[1000] ^= 1;
    db.execute("UPDATE blob_pieces SET data = ?1 WHERE id = ?2", rusqlite::params![data, id]).expect("tamper");
    drop(db);

    let downloads = bob.dir.path().join("downloads");
    std::fs::create_dir(&downloads).expect("downloads dir");
    let out = bob.run(&["receive", "--json", "--downloads", downloads.to_str().expect("utf-8 path")]);
    assert!(!out.status.success(), "a tampered attachment was accepted");
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("altered"), "{err}");
    assert_eq!(std::fs::read_dir(&downloads).expect("dir").count(), 0, "something was saved");
    // The message itself is kept, its attachment marked refused, not listed as saved.
    let m = the_attachment_message(&bob.history_json("alice"));
    assert!(attachments(&m)[0]["path"].is_null());
}

#[test]
fn the_size_limit_and_the_quota_give_clear_errors() {
    let server = Server::start_with(&["--max-blob-size", "1MiB", "--blob-quota-per-account", "2MiB"]);
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");

    let big = write_file(alice.dir.path(), "big.bin", &noise(1_200_000, 1));
    let out = alice.run(&["send", "bob", "--attach", big.to_str().expect("utf-8 path")]);
    assert_clean_error(&out, "at most 1 MiB");
    assert_eq!(exit_code(&out), 1);

    let small = write_file(alice.dir.path(), "small.bin", &noise(700_000, 2));
    let path = small.to_str().expect("utf-8 path");
    alice.ok(&["send", "bob", "--attach", path]);
    alice.ok(&["send", "bob", "--attach", path]);
    let out = alice.run(&["send", "bob", "--attach", path]);
    assert_clean_error(&out, "quota");
    assert_eq!(exit_code(&out), 1);
    // Once bob fetched them, the quota is free again.
    let downloads = bob.dir.path().join("d");
    std::fs::create_dir(&downloads).expect("dir");
    bob.ok(&["receive", "--downloads", downloads.to_str().expect("utf-8 path")]);
    alice.ok(&["send", "bob", "--attach", path]);
    // A file of exactly the limit fits (its blob is a little larger).
    let exact = write_file(alice.dir.path(), "exact.bin", &noise(1 << 20, 3));
    alice.ok(&["send", "bob", "--attach", exact.to_str().expect("utf-8 path")]);
}

/// Bytes of the blob the server holds, and the row id of its first piece.
fn upload_state(server: &Server) -> Option<(i64, i64)> {
    server
        .db()
        .query_row(
            "SELECT b.received, (SELECT MIN(p.id) FROM blob_pieces p WHERE p.blob = b.id AND p.start = 0) FROM blobs b",
            [],
            |r| Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(0))),
        )
        .ok()
}

#[test]
fn an_interrupted_upload_resumes_where_it_stopped() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    bob.ok(&["receive"]);
    let size = 80 << 20;
    let plain = noise(size, 11);
    let file = write_file(alice.dir.path(), "film.mp4", &plain);
    let path = file.to_str().expect("utf-8 path");

    // The server goes down once the first piece is in.
    let child = alice
        .cmd(&["send", "bob", "--attach", path])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("send starts");
    assert!(
        wait_until(std::time::Duration::from_secs(180), || upload_state(&server).is_some_and(|(got, _)| got > 0)),
        "the upload never started"
    );
    server.kill();
    let out = child.wait_with_output().expect("send ends");
    assert!(!out.status.success(), "the upload finished before it could be interrupted");
    let (before, first_piece) = upload_state(&server).expect("a blob");
    assert!(before > 0 && (before as usize) < size, "{before}");

    // The same command again: the same blob, from where it stopped.
    server.restart_with(&[]);
    alice.ok(&["send", "bob", "--attach", path]);
    assert_eq!(server.count("blobs"), 1, "the upload started over as a new blob");
    assert_eq!(upload_state(&server).map(|(_, p)| p), Some(first_piece), "the first piece was sent again");
    // Nothing staged is left once it is sent.
    let staged: Vec<_> = std::fs::read_dir(alice.home().join("attachments"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "{staged:?}");

    let downloads = bob.dir.path().join("downloads");
    std::fs::create_dir(&downloads).expect("dir");
    let m = the_attachment_message(&bob.receive_json(&["--downloads", downloads.to_str().expect("utf-8 path")]));
    assert_eq!(attachments(&m)[0]["sha256"].as_str(), Some(&*sha256_hex(&plain)));
    assert_eq!(sha256_hex(&std::fs::read(downloads.join("film.mp4")).expect("saved")), sha256_hex(&plain));
}

/// The size of bob's partial download, if one is in progress.
fn partial_len(home: &Path) -> u64 {
    std::fs::read_dir(home.join("attachments"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let mut server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    bob.ok(&["receive"]);
    let plain = noise(60 << 20, 23);
    let file = write_file(alice.dir.path(), "archive.zip", &plain);
    alice.ok(&["send", "bob", "--attach", file.to_str().expect("utf-8 path")]);

    // The server goes down once bob holds the first piece.
    let downloads = bob.dir.path().join("downloads");
    std::fs::create_dir(&downloads).expect("dir");
    let dl = downloads.to_str().expect("utf-8 path");
    let child = bob
        .cmd(&["receive", "--downloads", dl])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("receive starts");
    assert!(
        wait_until(std::time::Duration::from_secs(180), || partial_len(&bob.home()) >= 4 << 20),
        "the download never started"
    );
    server.kill();
    let out = child.wait_with_output().expect("receive ends");
    assert!(!out.status.success(), "the download finished before it could be interrupted");
    assert_eq!(std::fs::read_dir(&downloads).expect("dir").count(), 0, "a partial file was saved");

    // The operator now alters the first piece, which bob already holds: a
    // download that started over would fetch it again and refuse the file.
    let db = server.db();
    let (id, mut data): (i64, Vec<u8>) = db
        .query_row("SELECT id, data FROM blob_pieces WHERE start = 0", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("the first piece");
    data[1000] ^= 1;
    db.execute("UPDATE blob_pieces SET data = ?1 WHERE id = ?2", rusqlite::params![data, id]).expect("alter");
    drop(db);
    server.restart_with(&[]);
    bob.ok(&["receive", "--downloads", dl]);
    assert_eq!(sha256_hex(&std::fs::read(downloads.join("archive.zip")).expect("saved")), sha256_hex(&plain));
    assert_eq!(server.count("blobs"), 0);
}

#[test]
fn a_downloads_directory_in_the_config_file_is_where_receive_saves_and_never_inside_the_home() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    alice.send("bob", "hello");
    let config = bob.home().join("config.toml");
    // Inside the home directory (among its encrypted files): refused.
    let inside = bob.home().join("plain");
    std::fs::write(&config, format!("downloads = {:?}\n", inside.to_str().expect("utf-8 path"))).expect("write");
    assert_clean_error(&bob.run(&["receive"]), "outside the home directory");
    std::fs::write(&config, "downloads = \"relative/dir\"\n").expect("write");
    assert_clean_error(&bob.run(&["receive"]), "absolute path");

    let downloads = bob.dir.path().join("saved here");
    std::fs::create_dir(&downloads).expect("dir");
    std::fs::write(&config, format!("downloads = {:?}\n", downloads.to_str().expect("utf-8 path"))).expect("write");
    let bytes = noise(10_000, 9);
    let file = write_file(alice.dir.path(), "notes.txt", &bytes);
    alice.ok(&["send", "bob", "see attached", "--attach", file.to_str().expect("utf-8 path")]);
    let m = the_attachment_message(&bob.receive_json(&[]));
    let saved = attachments(&m)[0]["path"].as_str().expect("saved without --downloads").to_string();
    assert!(std::path::Path::new(&saved).starts_with(&downloads), "{saved}");
    assert_eq!(sha256_hex(&std::fs::read(&saved).expect("read")), sha256_hex(&bytes));
}

/// The sealed files a device keeps in its home.
fn kept_files(user: &User) -> usize {
    std::fs::read_dir(user.home().join("attachments"))
        .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0)
}

/// "Delete for everyone" takes the files too: the recipient's sealed copy
/// leaves its store, not only the text its view.
#[test]
fn a_message_deleted_for_everyone_takes_its_files_from_every_store() {
    let server = Server::start();
    let alice = User::register(&server, "alice");
    let bob = User::register(&server, "bob");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(dir.path(), "plans.bin", &noise(64 * 1024, 7));
    alice.ok(&["send", "bob", "the plans", "--attach", file.to_str().expect("utf-8 path")]);
    let got = bob.receive_json(&[]);
    let m = the_attachment_message(&got);
    assert_eq!(kept_files(&bob), 1, "bob keeps the sealed file");
    let id = m["id"].as_str().expect("id").to_string();

    alice.ok(&["delete", "bob", &id]);
    bob.receive_json(&[]);
    assert_eq!(kept_files(&bob), 0, "the sealed file is still in bob's home");
    let history = bob.history_json("alice");
    let deleted = history.iter().find(|h| h["id"] == id.as_str()).expect("the deleted line stays");
    assert!(attachments(deleted).is_empty(), "{deleted}");
    assert_eq!(deleted["text"], "", "{deleted}");
}
