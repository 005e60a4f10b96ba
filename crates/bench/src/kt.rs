//! `kt-publish`: the key directory over a fresh SQLite database, as the
//! server runs it (subrosa-server's `KtDirectory`, akd 0.13, experimental
//! configuration).

use std::time::Instant;

use anyhow::Context as _;
use subrosa_client::kt::{verify_audit, verify_lookup_value};
use subrosa_proto::kt::directory_value;
use subrosa_proto::{DeviceId, DeviceRecord, Handle, B64};
use subrosa_server::kt::KtDirectory;
use subrosa_server::store::{SqliteStore, Store as _};

fn label(i: usize) -> Vec<u8> {
    format!("user{i:07}").into_bytes()
}

/// A directory value as the server computes it, for a made-up account.
fn value(i: usize, generation: u8) -> Vec<u8> {
    let device = DeviceRecord {
        device_id: DeviceId([generation; 8]),
        signature_key: B64(vec![generation; 32]),
        certificate: B64(vec![7; 100]),
    };
    directory_value(&(i as u64).to_be_bytes(), &[device]).to_vec()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Runs the figures for `handles` handles published in epochs of `batch`.
pub async fn run(handles: usize, batch: usize, samples: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let path = dir.path().join("server.db");
    let store = SqliteStore::open(&path).context("opening the SQLite store")?;
    let kt = KtDirectory::open(store.kt_storage()).await.context("opening the directory")?;
    println!("kt-publish: {handles} handles into a fresh SQLite-backed directory, epochs of at most {batch}");

    let started = Instant::now();
    let mut epochs = 0;
    let mut slowest = 0f64;
    for chunk_start in (0..handles).step_by(batch) {
        let end = (chunk_start + batch).min(handles);
        let updates = (chunk_start..end).map(|i| (label(i), value(i, 1))).collect();
        let t = Instant::now();
        kt.publish(updates).await.context("bulk publish")?;
        slowest = slowest.max(t.elapsed().as_secs_f64());
        epochs += 1;
    }
    let bulk = started.elapsed().as_secs_f64();
    println!(
        "  bulk: {epochs} epochs in {bulk:.1} s ({:.0} handles/s; slowest epoch {slowest:.2} s)",
        handles as f64 / bulk
    );

    // Each changed epoch is audited right after it is published, as an
    // auditor following the head does (auditing an older epoch later costs
    // more: akd walks the paths changed since, too).
    let mut audits = Vec::new();
    for changed in [1usize, 100] {
        let changed = changed.min(handles);
        let step = handles / changed;
        let updates = (0..changed).map(|i| (label(i * step), value(i * step, 2 + changed as u8))).collect();
        let t = Instant::now();
        let (epoch, _) = kt.publish(updates).await.context("publish")?;
        println!(
            "  epoch {epoch} with {changed} changed handle(s) on top of {handles}: {:.1} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        let t = Instant::now();
        let audit = kt.audit(epoch - 1, epoch).await?;
        let gen = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        verify_audit(&audit, audit.from, audit.to).await.map_err(|e| anyhow::anyhow!("audit fails: {e}"))?;
        audits.push(format!(
            "  append-only proof {}->{epoch} ({changed} changed): {} bytes protobuf; generation {gen:.1} ms; verification {:.2} ms",
            epoch - 1,
            audit.proofs[0].len(),
            t.elapsed().as_secs_f64() * 1000.0
        ));
    }

    let vrf = kt.vrf_public_key();
    let mut gen_ms = Vec::new();
    let mut verify_us = Vec::new();
    let mut sizes = Vec::new();
    for s in 0..samples {
        let i = (s * 7919) % handles;
        let handle = Handle::new(std::str::from_utf8(&label(i))?).map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = Instant::now();
        let (lookup, proven) = kt.lookup(&label(i)).await?.context("a published handle has no proof")?;
        gen_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        sizes.push(lookup.proof.len());
        let t = Instant::now();
        verify_lookup_value(&vrf, &handle, &lookup, &proven).map_err(|e| anyhow::anyhow!("lookup proof fails: {e}"))?;
        verify_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    gen_ms.sort_by(f64::total_cmp);
    verify_us.sort_by(f64::total_cmp);
    sizes.sort_unstable();
    println!(
        "  lookup proof ({samples} handles): {}..{} bytes protobuf (median {}); server generation p50 {:.2} ms; client verification (decode + lookup_verify) p50 {:.0} µs, p90 {:.0} µs",
        sizes[0],
        sizes[sizes.len() - 1],
        sizes[sizes.len() / 2],
        percentile(&gen_ms, 0.5),
        percentile(&verify_us, 0.5),
        percentile(&verify_us, 0.9)
    );

    for line in audits {
        println!("{line}");
    }
    let db_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(path.with_extension("db-wal")).map(|m| m.len()).unwrap_or(0);
    println!("  database: {:.1} MB (with WAL)", db_bytes as f64 / 1e6);
    Ok(())
}
