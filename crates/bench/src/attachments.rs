//! `attachments`: upload and download throughput of one attachment through
//! a real in-process server, beside raw AES-256-GCM over the same bytes:
//! what sealing in STREAM segments, padding, signing each 4 MiB piece and
//! storing it cost. Figures only, never assertions.

use std::time::Instant;

use anyhow::Context as _;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use subrosa_client::{Subrosa, Target};
use subrosa_proto::Handle;
use subrosa_server::ServerConfig;

const PASSPHRASE: &str = "subrosa-bench passphrase";

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}

/// Raw AES-256-GCM over `data` in the same 64 KiB segments, in place.
fn raw_aes_gcm(data: &mut [u8]) -> anyhow::Result<f64> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7; 32]).context("aes key")?);
    let start = Instant::now();
    for (i, chunk) in data.chunks_mut(subrosa_client::attachment::SEGMENT).enumerate() {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag =
            key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), chunk).context("seal")?;
        let _ = std::hint::black_box(tag);
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Sends one file of `mib` MiB from one user to another and prints MiB/s.
pub async fn run(mib: u64) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("subrosa-bench-").tempdir().context("temporary directory")?;
    let size = mib << 20;
    let mut config = ServerConfig::new("127.0.0.1:0".parse().context("address")?, tmp.path().join("server"));
    config.limits.blobs.max_bytes = subrosa_client::attachment::blob_len(size);
    config.limits.blobs.account_bytes = u64::MAX;
    config.limits.requests_per_second = 0;
    let server = subrosa_server::start(config).await.context("cannot start the in-process server")?;
    let url = server.url();
    println!("server: in-process at {url}, SQLite in {}", tmp.path().join("server").display());

    let tag = format!("{:08x}", rand::random::<u32>());
    let (alice_home, bob_home) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let alice = Subrosa::register(&alice_home, PASSPHRASE, &format!("alice{tag}"), &url).await?;
    let bob = Subrosa::register(&bob_home, PASSPHRASE, &format!("bob{tag}"), &url).await?;
    let to = Target::Direct(Handle::new(&format!("bob{tag}"))?);
    alice.send_text(&to, "hello").await?;
    bob.receive(std::time::Duration::ZERO, true, &mut |_| {}).await?;

    let file = tmp.path().join("file.bin");
    let mut data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &data).context("write the file")?;
    let blob = subrosa_client::attachment::blob_len(size);
    println!("file: {mib} MiB; blob (padded, tagged): {} bytes", blob);

    let raw = raw_aes_gcm(&mut data)?;
    drop(data);
    // Sealing and uploading timed apart, by the progress the send reports.
    let start = Instant::now();
    let (mut sealed, mut upload_from, mut uploaded) = (None, None, None);
    alice
        .send_attachments(&alice_home, &to, "", std::slice::from_ref(&file), false, &mut |label, done, total| {
            let now = Instant::now();
            if label.starts_with("sealing") && done == total {
                sealed = Some(now);
            }
            if label.starts_with("uploading") {
                upload_from.get_or_insert(now);
                if done == total {
                    uploaded = Some(now);
                }
            }
        })
        .await?;
    let send = start.elapsed().as_secs_f64();
    let seal = sealed.map_or(0.0, |t| t.duration_since(start).as_secs_f64());
    let upload = match (upload_from, uploaded) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };

    let start = Instant::now();
    bob.receive(std::time::Duration::ZERO, true, &mut |_| {}).await?;
    let refused = bob.fetch_attachments(&bob_home, &mut |_, _, _| {}).await?;
    anyhow::ensure!(refused.is_empty(), "the attachment was refused: {:?}", refused.first().map(|r| &r.1));
    let download = start.elapsed().as_secs_f64();
    let out = tmp.path().join("saved");
    std::fs::create_dir(&out).context("downloads dir")?;
    let start = Instant::now();
    bob.save_attachments(&bob_home, &out)?;
    let save = start.elapsed().as_secs_f64();

    let curl = curl_upload(&alice, &bob, tmp.path(), blob).await?;

    println!("{:<58} {:>10}", "step", "MiB/s");
    println!("{:<58} {:>10.1}", "raw AES-256-GCM, 64 KiB chunks, in memory (aws-lc-rs)", mib_s(size, raw));
    println!("{:<58} {:>10.1}", "seal: read file, STREAM AES-256-GCM, SHA-256, write blob", mib_s(size, seal));
    println!("{:<58} {:>10.1}", "upload: signed 4 MiB pieces to the server, stored", mib_s(size, upload));
    match curl {
        Some(secs) => {
            println!("{:<58} {:>10.1}", "baseline: curl PUTs the same pieces, pre-signed, stored", mib_s(size, secs))
        }
        None => println!("{:<58} {:>10}", "baseline: curl PUTs the same pieces (curl not found)", "-"),
    }
    println!("{:<58} {:>10.1}", "send end to end: seal + upload + message", mib_s(size, send));
    println!("{:<58} {:>10.1}", "receive: message, download, check every segment + SHA-256", mib_s(size, download));
    println!("{:<58} {:>10.1}", "save: open the kept blob into the downloads folder", mib_s(size, save));
    server.shutdown().await;
    Ok(())
}

/// The upload baseline: `curl` PUTs a blob of the same padded size to the
/// same server, in the same 4 MiB pieces, each request signed beforehand
/// (signing and writing the pieces are not timed), one connection reused.
/// It shows what our client adds over a plain HTTP upload of the same
/// bytes; the server's work is the same. `None` when curl is not installed.
async fn curl_upload(alice: &Subrosa, bob: &Subrosa, dir: &std::path::Path, blob: u64) -> anyhow::Result<Option<f64>> {
    use std::fmt::Write as _;
    if std::process::Command::new("curl").arg("--version").output().is_err() {
        return Ok(None);
    }
    let api = alice.api();
    let created = api.blob_create(blob, vec![bob.identity().address()], None).await?;
    let pieces = dir.join("curl");
    std::fs::create_dir(&pieces).context("curl pieces dir")?;
    let mut config = String::new();
    let (mut offset, mut i) = (0u64, 0usize);
    while offset < blob {
        let len = (blob - offset).min(subrosa_client::blobs::PIECE as u64);
        let piece: Vec<u8> = (0..len).map(|j| (j as u8) ^ (i as u8)).collect();
        let file = pieces.join(format!("{i}"));
        std::fs::write(&file, &piece).context("write a piece")?;
        let path = format!("/v1/blobs/{}?offset={offset}", created.blob);
        let url = api.base().join(&path).context("url")?;
        if i > 0 {
            config.push_str("next\n");
        }
        let _ = writeln!(config, "url = \"{url}\"\nrequest = \"PUT\"\ndata-binary = \"@{}\"", file.display());
        let _ = writeln!(config, "output = \"/dev/null\"\nfail\nsilent\nshow-error");
        for (k, v) in api.signed_headers("PUT", &path, &piece)? {
            let _ = writeln!(config, "header = \"{k}: {v}\"");
        }
        offset += len;
        i += 1;
    }
    let config_file = pieces.join("config");
    std::fs::write(&config_file, config).context("write the curl config")?;
    let start = Instant::now();
    // Off the runtime's threads: the in-process server answers meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl").arg("--config").arg(&config_file).output()
    })
    .await
    .context("curl task")?
    .context("curl")?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    let status = api.blob_status(&created.blob).await?;
    anyhow::ensure!(status.received == blob, "curl stored {} of {blob} bytes", status.received);
    Ok(Some(secs))
}
