//! `compare`: the figures of a `load --json` run beside an `xmpp --json` run,
//! with the ratio and the target of issue 5 where there is one.

use std::path::Path;

use anyhow::Context as _;

use crate::loadgen::{Results, Traffic};

fn read(path: &Path) -> anyhow::Result<Results> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a figures file of subrosa-bench", path.display()))
}

/// Better is higher or lower.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// One row: our value, theirs, and optionally the target ratio.
struct Row {
    what: String,
    ours: Option<f64>,
    theirs: Option<f64>,
    better: Better,
    /// Target as ours/theirs: at least (Higher) or at most (Lower).
    target: Option<f64>,
    decimals: usize,
}

/// A row whose two values are the same figure `f` of each side's results.
fn row<T>(
    what: impl Into<String>,
    a: Option<&T>,
    b: Option<&T>,
    f: impl Fn(&T) -> f64,
    better: Better,
    target: Option<f64>,
    decimals: usize,
) -> Row {
    Row { what: what.into(), ours: a.map(&f), theirs: b.map(&f), better, target, decimals }
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

impl Row {
    fn print(&self) {
        let ratio = match (self.ours, self.theirs) {
            (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
            _ => None,
        };
        let target = match (self.target, self.better) {
            (Some(t), Better::Higher) => format!(">= {t}x"),
            (Some(t), Better::Lower) => format!("<= {}", fraction(t)),
            (None, _) => String::new(),
        };
        let verdict = match (ratio, self.target) {
            (Some(r), Some(t)) => {
                let met = match self.better {
                    Better::Higher => r >= t,
                    Better::Lower => r <= t,
                };
                if met {
                    "met"
                } else {
                    "MISSED"
                }
            }
            _ => "",
        };
        println!(
            "{:<44} {:>12} {:>12} {:>9} {:>9} {:>7}",
            self.what,
            fmt(self.ours, self.decimals),
            fmt(self.theirs, self.decimals),
            ratio.map(|r| format!("{r:.3}x")).unwrap_or_else(|| "-".into()),
            target,
            verdict
        );
    }
}

fn fraction(t: f64) -> String {
    if t > 0.0 && t < 1.0 && ((1.0 / t) - (1.0 / t).round()).abs() < 1e-9 {
        format!("1/{:.0}", 1.0 / t)
    } else {
        format!("{t}x")
    }
}

fn traffic_rows(label: &str, a: Option<&Traffic>, b: Option<&Traffic>, rows: &mut Vec<Row>, targets: bool) {
    rows.push(row(
        format!("{label}: offered msgs/s"),
        a,
        b,
        |t| t.offered_per_s.unwrap_or(f64::NAN),
        Better::Higher,
        None,
        0,
    ));
    rows.push(row(
        format!("{label}: achieved (delivered) msgs/s"),
        a,
        b,
        |t| t.delivered_per_s,
        Better::Higher,
        None,
        0,
    ));
    rows.push(row(
        format!("{label}: sustained (1 = yes)"),
        a,
        b,
        |t| t.sustained.map_or(f64::NAN, |s| f64::from(u8::from(s))),
        Better::Higher,
        None,
        0,
    ));
    rows.push(row(format!("{label}: latency p50 ms"), a, b, |t| t.p50_ms, Better::Lower, None, 2));
    rows.push(row(format!("{label}: latency p99 ms"), a, b, |t| t.p99_ms, Better::Lower, targets.then_some(0.2), 2));
    rows.push(row(format!("{label}: server CPU us/msg"), a, b, |t| t.server_cpu_us_per_msg, Better::Lower, None, 1));
}

/// `subrosa-bench compare SUBROSA.json EJABBERD.json`.
pub fn run(ours: &Path, theirs: &Path) -> anyhow::Result<()> {
    let a = read(ours)?;
    let b = read(theirs)?;
    println!(
        "{} vs {}: {} vs {} connected devices, closed-loop concurrency {} vs {}, 200-byte messages",
        a.server, b.server, a.devices, b.devices, a.concurrency, b.concurrency
    );
    println!(
        "{:<44} {:>12} {:>12} {:>9} {:>9} {:>7}",
        "figure",
        a.server.chars().take(12).collect::<String>(),
        b.server.chars().take(12).collect::<String>(),
        "ratio",
        "target",
        ""
    );
    let mut rows = Vec::new();
    let (sa, sb) = (a.saturation.as_ref(), b.saturation.as_ref());
    rows.push(row("saturation: delivered msgs/s", sa, sb, |t| t.delivered_per_s, Better::Higher, None, 0));
    rows.push(row(
        "saturation: server CPU us/msg",
        sa,
        sb,
        |t| t.server_cpu_us_per_msg,
        Better::Lower,
        Some(1.0 / 3.0),
        1,
    ));
    rows.push(row("saturation: server CPU cores busy", sa, sb, |t| t.server_cores, Better::Lower, None, 2));
    rows.push(row("saturation: latency p50 ms", sa, sb, |t| t.p50_ms, Better::Lower, None, 2));
    rows.push(row("saturation: latency p99 ms", sa, sb, |t| t.p99_ms, Better::Lower, None, 2));
    rows.push(row("saturation: load generator CPU us/msg", sa, sb, |t| t.bench_cpu_us_per_msg, Better::Lower, None, 1));
    traffic_rows("open loop", a.open_loop.as_ref(), b.open_loop.as_ref(), &mut rows, true);
    if a.sustained.is_some() || b.sustained.is_some() {
        traffic_rows("highest sustained", a.sustained.as_ref(), b.sustained.as_ref(), &mut rows, false);
    }
    let counts: std::collections::BTreeSet<usize> = a.idle.iter().chain(b.idle.iter()).map(|m| m.connections).collect();
    for n in counts {
        let kib = |r: &Results| r.idle.iter().find(|m| m.connections == n).map(|m| m.per_connection / 1024.0);
        rows.push(Row {
            what: format!("idle: KiB RSS per connection at {n}"),
            ours: kib(&a),
            theirs: kib(&b),
            better: Better::Lower,
            target: Some(0.1),
            decimals: 1,
        });
    }
    let (da, db) = (a.deep.as_ref(), b.deep.as_ref());
    rows.push(row(
        format!("deep queue ({}): store msgs/s", da.or(db).map_or(0, |d| d.messages)),
        da,
        db,
        |d| d.store_per_s,
        Better::Higher,
        Some(30.0),
        0,
    ));
    rows.push(row("deep queue: drain msgs/s", da, db, |d| d.drain_per_s, Better::Higher, Some(3.0), 0));
    for r in &rows {
        r.print();
    }
    println!("ratio = {} / {}; targets are those of issue 5", a.server, b.server);
    Ok(())
}
