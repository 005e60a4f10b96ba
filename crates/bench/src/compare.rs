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
    let pick = |t: Option<&Traffic>, f: fn(&Traffic) -> f64| t.map(f);
    rows.push(Row {
        what: format!("{label}: offered msgs/s"),
        ours: pick(a, |t| t.offered_per_s.unwrap_or(f64::NAN)),
        theirs: pick(b, |t| t.offered_per_s.unwrap_or(f64::NAN)),
        better: Better::Higher,
        target: None,
        decimals: 0,
    });
    rows.push(Row {
        what: format!("{label}: achieved (delivered) msgs/s"),
        ours: pick(a, |t| t.delivered_per_s),
        theirs: pick(b, |t| t.delivered_per_s),
        better: Better::Higher,
        target: None,
        decimals: 0,
    });
    rows.push(Row {
        what: format!("{label}: sustained (1 = yes)"),
        ours: pick(a, |t| t.sustained.map_or(f64::NAN, |s| f64::from(u8::from(s)))),
        theirs: pick(b, |t| t.sustained.map_or(f64::NAN, |s| f64::from(u8::from(s)))),
        better: Better::Higher,
        target: None,
        decimals: 0,
    });
    rows.push(Row {
        what: format!("{label}: latency p50 ms"),
        ours: pick(a, |t| t.p50_ms),
        theirs: pick(b, |t| t.p50_ms),
        better: Better::Lower,
        target: None,
        decimals: 2,
    });
    rows.push(Row {
        what: format!("{label}: latency p99 ms"),
        ours: pick(a, |t| t.p99_ms),
        theirs: pick(b, |t| t.p99_ms),
        better: Better::Lower,
        target: targets.then_some(0.2),
        decimals: 2,
    });
    rows.push(Row {
        what: format!("{label}: server CPU us/msg"),
        ours: pick(a, |t| t.server_cpu_us_per_msg),
        theirs: pick(b, |t| t.server_cpu_us_per_msg),
        better: Better::Lower,
        target: None,
        decimals: 1,
    });
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
    rows.push(Row {
        what: "saturation: delivered msgs/s".into(),
        ours: sa.map(|t| t.delivered_per_s),
        theirs: sb.map(|t| t.delivered_per_s),
        better: Better::Higher,
        target: None,
        decimals: 0,
    });
    rows.push(Row {
        what: "saturation: server CPU us/msg".into(),
        ours: sa.map(|t| t.server_cpu_us_per_msg),
        theirs: sb.map(|t| t.server_cpu_us_per_msg),
        better: Better::Lower,
        target: Some(1.0 / 3.0),
        decimals: 1,
    });
    rows.push(Row {
        what: "saturation: server CPU cores busy".into(),
        ours: sa.map(|t| t.server_cores),
        theirs: sb.map(|t| t.server_cores),
        better: Better::Lower,
        target: None,
        decimals: 2,
    });
    rows.push(Row {
        what: "saturation: latency p50 ms".into(),
        ours: sa.map(|t| t.p50_ms),
        theirs: sb.map(|t| t.p50_ms),
        better: Better::Lower,
        target: None,
        decimals: 2,
    });
    rows.push(Row {
        what: "saturation: latency p99 ms".into(),
        ours: sa.map(|t| t.p99_ms),
        theirs: sb.map(|t| t.p99_ms),
        better: Better::Lower,
        target: None,
        decimals: 2,
    });
    rows.push(Row {
        what: "saturation: load generator CPU us/msg".into(),
        ours: sa.map(|t| t.bench_cpu_us_per_msg),
        theirs: sb.map(|t| t.bench_cpu_us_per_msg),
        better: Better::Lower,
        target: None,
        decimals: 1,
    });
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
    rows.push(Row {
        what: format!("deep queue ({}): store msgs/s", da.or(db).map_or(0, |d| d.messages)),
        ours: da.map(|d| d.store_per_s),
        theirs: db.map(|d| d.store_per_s),
        better: Better::Higher,
        target: Some(30.0),
        decimals: 0,
    });
    rows.push(Row {
        what: "deep queue: drain msgs/s".into(),
        ours: da.map(|d| d.drain_per_s),
        theirs: db.map(|d| d.drain_per_s),
        better: Better::Higher,
        target: Some(3.0),
        decimals: 0,
    });
    for r in &rows {
        r.print();
    }
    println!("ratio = {} / {}; targets are those of issue 5", a.server, b.server);
    Ok(())
}
