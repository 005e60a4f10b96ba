//! `updates`: what post-compromise security costs. For each group size N it
//! times one member's periodic key update (an empty commit with a path),
//! through subrosa-core and with mls-rs alone beside it: the time to make
//! the commit, its size, and the time another member takes to process it.
//! Then it prints what the client's update rules (crates/client rotation:
//! a device updates at most every 7 days above 100 members) cost every
//! member of a group of the largest size per day.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use mls_rs::ExtensionList;
use subrosa_core::{ConversationInfo, ConversationKind};

use crate::groups::{engine, ms, plain_client};

struct Row {
    make: Duration,
    bytes: usize,
    process: Duration,
}

fn ours(n: usize) -> Result<Row> {
    let creator = engine(0)?;
    let member = engine(1)?;
    let mut kps = vec![member.generate_key_package()?];
    for i in 2..n {
        kps.push(engine(i)?.generate_key_package()?);
    }
    let info = ConversationInfo { kind: ConversationKind::Group, name: format!("bench {n}") };
    let out = creator.create_conversation(&info, &kps)?;
    creator.confirm_commit(&out.conversation)?;
    member.join(&out.welcome.ok_or_else(|| anyhow!("no welcome"))?)?;
    let conv = out.conversation;

    let t = Instant::now();
    let update = member.update_keys(&conv)?;
    member.confirm_commit(&conv)?;
    let make = t.elapsed();
    let t = Instant::now();
    creator.process(&conv, &update.commit)?;
    let process = t.elapsed();
    Ok(Row { make, bytes: update.commit.len(), process })
}

fn mls_alone(n: usize) -> Result<Row> {
    let creator = plain_client(0)?;
    let member = plain_client(1)?;
    let none = ExtensionList::new;
    let mut kps = vec![member.generate_key_package_message(none(), none(), None)?];
    for i in 2..n {
        kps.push(plain_client(i)?.generate_key_package_message(none(), none(), None)?);
    }
    let mut group = creator.create_group(none(), none(), None)?;
    let mut builder = group.commit_builder();
    for kp in kps {
        builder = builder.add_member(kp)?;
    }
    let out = builder.build()?;
    group.apply_pending_commit()?;
    let welcome = out.welcome_messages.first().ok_or_else(|| anyhow!("no welcome"))?;
    let (mut mgroup, _) = member.join_group(None, welcome, None)?;

    let t = Instant::now();
    let update = mgroup.commit_builder().build()?;
    mgroup.apply_pending_commit()?;
    mgroup.write_to_storage()?;
    let make = t.elapsed();
    let bytes = update.commit_message.to_bytes()?.len();
    let t = Instant::now();
    group.process_incoming_message(update.commit_message)?;
    group.write_to_storage()?;
    let process = t.elapsed();
    Ok(Row { make, bytes, process })
}

/// Runs the update benchmark for each size.
///
/// # Errors
/// Any failure of the operations measured.
pub fn run(sizes: &[usize]) -> Result<()> {
    println!(
        "updates: one member's key update (empty commit with a path), in-process, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("(ours = subrosa-core: encrypted handshake, certified credentials; alone = mls-rs defaults)");
    println!(
        "  {:>7} {:>14} {:>14} {:>12} {:>12} {:>16} {:>16}",
        "N", "make (ours)", "make (alone)", "bytes (ours)", "bytes (alone)", "process (ours)", "process (alone)"
    );
    let mut last = None;
    for &n in sizes {
        let (o, a) = (ours(n)?, mls_alone(n)?);
        println!(
            "  {:>7} {:>14} {:>14} {:>12} {:>12} {:>16} {:>16}",
            n,
            ms(o.make),
            ms(a.make),
            o.bytes,
            a.bytes,
            ms(o.process),
            ms(a.process)
        );
        last = Some((n, o));
    }
    if let Some((n, o)) = last {
        // Above 100 members every device updates at most once a week (and
        // a busy sender at most once a day; the weekly figure is the floor).
        let period_days = if n > 100 { 7.0 } else { 1.0 };
        let commits = n as f64 / period_days;
        println!("\nthe update rules in a group of {n} devices (each updates every {period_days} day(s)):");
        println!(
            "  {:.0} update commits a day; each member downloads {:.1} MB and spends {:.1} s of CPU processing them",
            commits,
            commits * o.bytes as f64 / 1e6,
            commits * o.process.as_secs_f64()
        );
        println!("  (each member also makes its own update: {} once every {period_days} day(s))", ms(o.make));
    }
    Ok(())
}
