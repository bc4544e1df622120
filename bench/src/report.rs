//! Turns the JSON lines of `wsgate-bench run` into one Markdown table: per scenario and figure,
//! the median over runs for each server, the ratios wsgate/floor and wsgate/nchan, and the
//! target with its verdict. delivered/expected is the worst run, not the median.
//!
//! A ratio is the median of same-run ratios: each wsgate run divided by the other server's run
//! of the same round (`compare.sh` runs them back to back), so that a machine that drifts
//! during the session (these are shared VMs) moves both sides of each ratio together. Only
//! where no run pairs up is it the ratio of the medians.

use std::collections::BTreeMap;

use serde_json::Value;

const TARGETS: [&str; 3] = ["wsgate", "floor", "nchan"];

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// What a figure is checked against, if anything.
enum Check {
    None,
    /// wsgate's own value at most this.
    Abs(f64, &'static str),
    /// wsgate/floor at most this.
    VsFloor(f64, &'static str),
    /// wsgate/nchan at most this.
    VsNchan(f64, &'static str),
    /// Every run of every server exactly 1.0.
    AllOne,
}

struct Figure {
    key: &'static str,
    name: &'static str,
    /// Worst run instead of the median (delivered/expected).
    worst: bool,
    check: Check,
}

fn figures(scenario: &str) -> Vec<Figure> {
    let f = |key, name, check| Figure {
        key,
        name,
        worst: false,
        check,
    };
    let ratio = Figure {
        key: "ratio",
        name: "delivered / expected (worst run)",
        worst: true,
        check: Check::AllOne,
    };
    let delivery = matches!(scenario, "b" | "c");
    let mut v = match scenario {
        "a" => vec![
            f(
                "rss_per_conn_b",
                "RSS per idle subscribed connection (bytes)",
                Check::Abs(3072.0, "≤ 3 KiB"),
            ),
            f("connect_s", "time to connect + subscribe all (s)", Check::None),
        ],
        "e" => vec![
            ratio,
            f("publishes_per_s", "publishes accepted / s", Check::None),
            f("cpu_ns_per_publish", "server CPU per publish (ns)", Check::None),
            f("srv_cpu_pct", "server CPU %", Check::None),
            f("gen_cpu_pct", "generator CPU %", Check::None),
            f("other_cpu_pct", "other processes' CPU % (noise)", Check::None),
        ],
        _ => vec![
            ratio,
            f("deliveries_per_s", "deliveries / s", Check::None),
            f(
                "cpu_ns_per_delivery",
                "server CPU per delivery, user+sys (ns)",
                if delivery {
                    Check::VsFloor(1.05, "≤ 1.05 × floor")
                } else if scenario == "d10" {
                    Check::VsNchan(0.5, "≤ 0.5 × Nchan")
                } else {
                    Check::None
                },
            ),
            f(
                "user_ns_per_delivery",
                "  user (ns)",
                if delivery {
                    Check::Abs(1000.0, "≤ 1000 ns")
                } else {
                    Check::None
                },
            ),
            f("sys_ns_per_delivery", "  system (ns)", Check::None),
            f(
                "lat_p50_us",
                "publish→receive p50 (µs)",
                if scenario == "b" {
                    Check::VsFloor(1.2, "≤ 1.2 × floor")
                } else {
                    Check::None
                },
            ),
            f("lat_p99_us", "p99 (µs)", Check::None),
            f("lat_p999_us", "p99.9 (µs)", Check::None),
            f("lat_max_us", "max (µs)", Check::None),
            f("srv_cpu_pct", "server CPU %", Check::None),
            f(
                "gen_cpu_pct",
                "generator CPU % (≈100: generator-bound)",
                Check::None,
            ),
            f("other_cpu_pct", "other processes' CPU % (noise)", Check::None),
        ],
    };
    if scenario == "a" {
        v.push(Figure {
            key: "ratio",
            name: "connections subscribed / asked (worst run)",
            worst: true,
            check: Check::AllOne,
        });
    }
    v
}

fn describe(scenario: &str, r: &Value) -> String {
    let conns = r["conns"].as_u64().unwrap_or(0);
    let topics = r["topics"].as_u64().unwrap_or(0);
    let rate = r["rate"].as_f64().unwrap_or(0.0);
    let batch = r["batch"].as_u64().unwrap_or(1);
    let rate_s = if rate > 0.0 {
        format!("{rate:.0} events/s")
    } else {
        "as fast as possible".to_owned()
    };
    let what = match scenario {
        "a" => format!("{conns} idle subscribed connections"),
        "e" => format!("publish ingest, no subscribers, {topics} topics, {rate_s}"),
        _ => format!("{conns} conns / {topics} topics / {rate_s}, batch {batch}"),
    };
    format!("({scenario}) {what}")
}

pub fn report(text: &str) -> String {
    // scenario -> target -> runs
    let mut by: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let s = v["scenario"].as_str().unwrap_or("?").to_owned();
        let t = v["target"].as_str().unwrap_or("?").to_owned();
        if !order.contains(&s) {
            order.push(s.clone());
        }
        by.entry(s).or_default().entry(t).or_default().push(v);
    }
    let mut out = String::new();
    out.push_str(
        "| scenario | figure | wsgate | floor | nchan | wsgate/floor | wsgate/nchan | target | verdict |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---|---|\n");
    let mut misses = Vec::new();
    for s in &order {
        let runs = &by[s];
        let Some(any) = runs.values().flatten().next() else {
            continue;
        };
        let counts: Vec<String> = TARGETS
            .iter()
            .filter_map(|t| runs.get(*t).map(|r| format!("{t} ×{}", r.len())))
            .collect();
        let title = format!("{} — runs: {}", describe(s, any), counts.join(", "));
        for (i, fig) in figures(s).iter().enumerate() {
            // (run number, value) of each run of server `t`.
            let per_run = |t: &str| -> Vec<(u64, f64)> {
                let Some(rs) = runs.get(t) else {
                    return Vec::new();
                };
                rs.iter()
                    .map(|r| {
                        let v = if s == "a" && fig.key == "ratio" {
                            // For the idle scenario the "ratio" is connections that subscribed.
                            r["ready"].as_f64().unwrap_or(0.0) / r["conns"].as_f64().unwrap_or(1.0).max(1.0)
                        } else {
                            r[fig.key].as_f64().unwrap_or(f64::NAN)
                        };
                        (r["run"].as_u64().unwrap_or(0), v)
                    })
                    .collect()
            };
            let val = |t: &str| -> Option<f64> {
                runs.get(t)?;
                let vals: Vec<f64> = per_run(t).into_iter().map(|(_, v)| v).collect();
                if fig.worst {
                    vals.iter().copied().filter(|x| x.is_finite()).reduce(f64::min)
                } else {
                    median(vals)
                }
            };
            let (w, fl, nc) = (val("wsgate"), val("floor"), val("nchan"));
            let same_run = |other: &str, fallback: Option<f64>| -> Option<f64> {
                if fig.worst {
                    return fallback;
                }
                let theirs = per_run(other);
                let pairs: Vec<f64> = per_run("wsgate")
                    .into_iter()
                    .filter_map(|(run, mine)| {
                        let (_, t) = theirs.iter().find(|(r, _)| *r == run)?;
                        ratio(Some(mine), Some(*t))
                    })
                    .collect();
                median(pairs).or(fallback)
            };
            let (rf, rn) = (same_run("floor", ratio(w, fl)), same_run("nchan", ratio(w, nc)));
            let (target, verdict) = match &fig.check {
                Check::None => (String::new(), String::new()),
                Check::Abs(max, label) => (label.to_string(), verdict(w.map(|x| x <= *max))),
                Check::VsFloor(max, label) => (label.to_string(), verdict(rf.map(|x| x <= *max))),
                Check::VsNchan(max, label) => (label.to_string(), verdict(rn.map(|x| x <= *max))),
                Check::AllOne => {
                    let present: Vec<f64> = [w, fl, nc].into_iter().flatten().collect();
                    (
                        "1.0 in every run".to_owned(),
                        verdict((!present.is_empty()).then(|| present.iter().all(|&x| x == 1.0))),
                    )
                }
            };
            if verdict.starts_with("MISSED") {
                misses.push(format!("({s}) {}", fig.name.trim()));
            }
            let ratio_s = |r: Option<f64>| r.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".to_owned());
            let fmt_v = |x: Option<f64>| {
                if fig.worst {
                    x.map(|v| format!("{v:.6}")).unwrap_or_else(|| "–".into())
                } else {
                    fmt(x)
                }
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                if i == 0 { title.as_str() } else { "" },
                fig.name,
                fmt_v(w),
                fmt_v(fl),
                fmt_v(nc),
                ratio_s(rf),
                ratio_s(rn),
                target,
                verdict
            ));
        }
    }
    if misses.is_empty() {
        out.push_str("\nAll checked targets met.\n");
    } else {
        out.push_str(&format!("\nTargets missed: {}\n", misses.join("; ")));
    }
    out
}

fn verdict(v: Option<bool>) -> String {
    match v {
        Some(true) => "met".to_owned(),
        Some(false) => "MISSED".to_owned(),
        None => "n/a".to_owned(),
    }
}
