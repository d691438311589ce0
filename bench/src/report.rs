//! The report: a markdown table per cell, a bar chart per cell as SVG drawn
//! here (throughput and proxy CPU per unit side by side), and every run as
//! JSON.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::load::Mode;
use crate::plan::{Cell, Results, Summary};

/// How, where and when the numbers were taken.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Meta {
    pub command: String,
    pub started: String,
    pub finished: String,
    pub host: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub load_before: String,
    pub load_after: String,
    pub pinning: String,
    pub rounds: usize,
    pub warmup_s: f64,
    pub window_s: f64,
    /// (name, what it is, version)
    pub peers: Vec<(String, String, String)>,
    pub notes: Vec<String>,
}

/// Text of a command's first output line (empty when it fails).
pub(crate) fn sh(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

/// CPU (% of one) used by other processes in a window above which the
/// report says the machine was not quiet.
const NOISY_PCT: f64 = 5.0;

fn mib(kib: Option<f64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.1}", k / 1024.0))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn rate_text(mode: &Mode, v: f64) -> String {
    if mode.moves_bytes() {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn cpu_text(mode: &Mode, v: Option<f64>) -> String {
    match mode {
        m if m.moves_bytes() => num(v, 3),
        Mode::Idle { .. } => num(v, 2),
        _ => num(v, 1),
    }
}

/// The columns of a cell's table between `peer | via` and `rounds ok`:
/// their titles, and a summary's values.
type Values = fn(&Summary) -> Vec<String>;

fn columns(mode: &Mode) -> (Vec<String>, Values) {
    let titles = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    match mode {
        Mode::Idle { .. } => (
            titles(&[
                "tunnels held",
                "RSS before (MiB)",
                "RSS held (MiB)",
                "KiB per tunnel",
                "threads before → held",
                "ping p99 (µs)",
            ]),
            |s| {
                vec![
                    num(s.rate, 0),
                    mib(s.base_rss_kib),
                    mib(s.rss_kib),
                    num(s.rss_per_tunnel_kib, 1),
                    format!("{} → {}", num(s.base_threads, 0), num(s.threads, 0)),
                    num(s.latency_us.map(|l| l.p99), 0),
                ]
            },
        ),
        Mode::TlsBulk { .. } => (
            titles(&[
                "Gbit/s",
                "min–max",
                "proxy CPU-s/GB",
                "min–max",
                "peak RSS (MiB)",
                "threads",
            ]),
            |s| {
                vec![
                    num(s.rate, 2),
                    format!("{}–{}", num(s.rate_min, 2), num(s.rate_max, 2)),
                    num(s.cpu_per_unit, 3),
                    format!("{}–{}", num(s.cpu_min, 3), num(s.cpu_max, 3)),
                    mib(s.peak_rss_kib),
                    num(s.threads, 0),
                ]
            },
        ),
        m if m.moves_bytes() => (
            titles(&[
                "Gbit/s",
                "min–max",
                "proxy CPU-s/GB",
                "min–max",
                "device CPU-s/GB",
                "peak RSS (MiB)",
                "threads",
            ]),
            |s| {
                // CPU-s per GB: three digits (see cpu_text).
                vec![
                    num(s.rate, 2),
                    format!("{}–{}", num(s.rate_min, 2), num(s.rate_max, 2)),
                    num(s.cpu_per_unit, 3),
                    format!("{}–{}", num(s.cpu_min, 3), num(s.cpu_max, 3)),
                    num(s.device_cpu_per_unit, 3),
                    mib(s.peak_rss_kib),
                    num(s.threads, 0),
                ]
            },
        ),
        Mode::Setup { .. } => (
            titles(&[
                "conn/s",
                "open p50 (µs)",
                "open p90",
                "open p99",
                "echo p50 (µs)",
                "echo p99",
                "proxy CPU-µs/op",
                "device CPU-µs/op",
            ]),
            |s| {
                let (o, l) = (s.open_us, s.latency_us);
                vec![
                    num(s.rate, 0),
                    num(o.map(|l| l.p50), 1),
                    num(o.map(|l| l.p90), 1),
                    num(o.map(|l| l.p99), 1),
                    num(l.map(|l| l.p50), 1),
                    num(l.map(|l| l.p99), 1),
                    num(s.cpu_per_unit, 1),
                    num(s.device_cpu_per_unit, 1),
                ]
            },
        ),
        Mode::TlsHandshake { .. } => (
            titles(&[
                "conn/s",
                "min–max",
                "p50 (µs)",
                "p99",
                "proxy CPU-µs/op",
                "min–max",
                "ops per proxy CPU-s",
                "resumed",
                "peak RSS (MiB)",
            ]),
            |s| {
                let l = s.latency_us;
                vec![
                    num(s.rate, 0),
                    format!("{}–{}", num(s.rate_min, 0), num(s.rate_max, 0)),
                    num(l.map(|l| l.p50), 1),
                    num(l.map(|l| l.p99), 1),
                    num(s.cpu_per_unit, 1),
                    format!("{}–{}", num(s.cpu_min, 1), num(s.cpu_max, 1)),
                    num(s.cpu_per_unit.filter(|&c| c > 0.0).map(|c| 1e6 / c), 0),
                    s.tls_resumed_share.map_or("–".into(), |r| {
                        format!("{:.1} % of {}", r * 100.0, s.tls_handshakes.unwrap_or(0))
                    }),
                    mib(s.peak_rss_kib),
                ]
            },
        ),
        m => {
            let mut t = vec![m.rate_unit().to_string()];
            t.extend(titles(&[
                "min–max",
                "p50 (µs)",
                "p90",
                "p99",
                "p99.9",
                "proxy CPU-µs/op",
                "device CPU-µs/op",
                "peak RSS (MiB)",
                "threads",
            ]));
            (t, |s| {
                let l = s.latency_us;
                let mut v = vec![
                    num(s.rate, 0),
                    format!("{}–{}", num(s.rate_min, 0), num(s.rate_max, 0)),
                ];
                v.extend(
                    [
                        l.map(|l| l.p50),
                        l.map(|l| l.p90),
                        l.map(|l| l.p99),
                        l.map(|l| l.p999),
                    ]
                    .map(|p| num(p, 1)),
                );
                // CPU-µs per operation: one digit (see cpu_text).
                v.extend([
                    num(s.cpu_per_unit, 1),
                    num(s.device_cpu_per_unit, 1),
                    mib(s.peak_rss_kib),
                    num(s.threads, 0),
                ]);
                v
            })
        }
    }
}

/// The markdown tables (one per cell), with links to `<cell>.svg` when
/// `plots`.
pub(crate) fn markdown(meta: &Meta, cells: &[Cell], res: &Results, plots: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# splicegate-bench: splicegate next to its peers\n");
    let _ = writeln!(
        md,
        "- command: `{}`\n- machine: {} ({} CPUs, {}); load average before {}, after {}\n- \
         run: {} – {}; {} round(s), each run {:.1} s warm-up + {:.1} s measured; the table \
         shows medians over the rounds that completed\n- pinning: {}",
        meta.command,
        meta.host,
        meta.cpus,
        meta.cpu_model,
        meta.load_before,
        meta.load_after,
        meta.started,
        meta.finished,
        meta.rounds,
        meta.warmup_s,
        meta.window_s,
        meta.pinning
    );
    for n in &meta.notes {
        let _ = writeln!(md, "- {n}");
    }
    let _ = writeln!(md, "\n## Peers\n\n| peer | what | version |\n|---|---|---|");
    for (name, what, version) in &meta.peers {
        let _ = writeln!(md, "| {name} | {what} | {version} |");
    }
    if !res.skipped.is_empty() {
        let _ = writeln!(md, "\nSkipped:");
        for (p, why) in &res.skipped {
            let _ = writeln!(md, "- {p}: {why}");
        }
    }
    let _ = writeln!(
        md,
        "\nProxy cost is read from /proc for the proxy's process and its descendants: CPU = \
         utime + stime (+ reaped children) over the measured window; peak RSS = sum of VmHWM at \
         the window's end (each peer starts afresh for every run); threads at the window's end. \
         GB = 10^9 bytes. Latencies are per operation as the client sees them (connrate: connect \
         until the echo is back; setup: `open` is connect until the proxy's 200, or the TCP \
         connect without a proxy or through an L4 relay, `echo` connect until the 100 bytes are \
         back). Reverse tunnels (splicegate-agent, rathole): `proxy` is the gateway side, \
         `device` the process on the device side (splicegate-agent, rathole's client), measured \
         apart."
    );
    for cell in cells {
        let rows: Vec<&Summary> = res.summaries.iter().filter(|s| s.cell == cell.id).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(md, "\n## {}\n", cell.title);
        let (titles, values) = columns(&cell.mode);
        let _ = writeln!(
            md,
            "| peer | via | {} | rounds ok |\n|---|---|{}",
            titles.join(" | "),
            "---:|".repeat(titles.len() + 1)
        );
        for s in &rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {}/{} |",
                s.peer,
                s.route,
                values(s).join(" | "),
                s.rounds_ok,
                s.rounds
            );
        }
        let mut notes: Vec<String> = rows
            .iter()
            .filter_map(|s| {
                s.note
                    .as_ref()
                    .map(|n| format!("- {}: {} errors; first: {n}", s.peer, s.errors))
            })
            .collect();
        notes.extend(
            rows.iter()
                .filter(|s| s.others_cpu_pct_max.is_some_and(|p| p >= NOISY_PCT))
                .map(|s| {
                    format!(
                        "- {}: other programs on the machine used at least {:.0} % of a CPU in \
                         a round's window (the machine was not quiet)",
                        s.peer,
                        s.others_cpu_pct_max.unwrap_or(0.0)
                    )
                }),
        );
        notes.extend(rows.iter().filter_map(|s| {
            s.tls_params
                .as_ref()
                .map(|p| format!("- {}: TLS negotiated {p}", s.peer))
        }));
        notes.extend(rows.iter().filter(|s| s.reconnects > 0).map(|s| {
            format!(
                "- {}: closed kept-alive connections {} times without `Connection: close`; \
                 those requests went again on a new connection (their latency includes it)",
                s.peer, s.reconnects
            )
        }));
        if !notes.is_empty() {
            let _ = writeln!(md, "\n{}", notes.join("\n"));
        }
        if plots {
            let _ = writeln!(md, "\n![{}]({}.svg)", cell.title, cell.id);
        }
    }
    md
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One bar: its row's label, its value (none: a dash), the text beside it.
pub(crate) struct Bar {
    pub label: String,
    pub value: Option<f64>,
    pub text: String,
    pub color: &'static str,
}

/// One panel of a chart: a title over bars of one scale.
pub(crate) struct Panel {
    pub title: String,
    pub bars: Vec<Bar>,
}

/// Horizontal bar charts under one title, two panels a row, each panel
/// scaled to its own largest value; row labels left of the first column.
pub(crate) fn bar_chart(title: &str, panels: &[Panel], footer: &str) -> String {
    const LABEL: f64 = 150.0;
    const PANEL: f64 = 330.0;
    const GAP: f64 = 70.0;
    const ROW: f64 = 26.0;
    const HEAD: f64 = 40.0;
    const TOP: f64 = 24.0;
    let columns = panels.len().clamp(1, 2);
    let rows = panels.iter().map(|p| p.bars.len()).max().unwrap_or(0) as f64;
    let block = HEAD + ROW * rows + 10.0;
    let width = LABEL + columns as f64 * (PANEL + GAP) - GAP + 20.0;
    let height = TOP + block * panels.len().div_ceil(2) as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"##,
        esc(title)
    );
    for (k, panel) in panels.iter().enumerate() {
        let x0 = LABEL + (k % 2) as f64 * (PANEL + GAP);
        let y0 = TOP + (k / 2) as f64 * block;
        let _ = writeln!(
            s,
            r##"<text x="{x0}" y="{}" font-weight="bold">{}</text>"##,
            y0 + 24.0,
            esc(&panel.title)
        );
        let max = panel
            .bars
            .iter()
            .filter_map(|b| b.value)
            .fold(0.0f64, f64::max)
            .max(1e-12);
        for (i, bar) in panel.bars.iter().enumerate() {
            let y = y0 + HEAD + i as f64 * ROW;
            if k % 2 == 0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="end">{}</text>"##,
                    LABEL - 8.0,
                    y + 16.0,
                    esc(&bar.label)
                );
            }
            match bar.value {
                Some(v) => {
                    let w = (v / max * (PANEL - 60.0)).max(1.0);
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x0}" y="{}" width="{w:.1}" height="{}" fill="{}"/><text x="{:.1}" y="{}">{}</text>"##,
                        y + 3.0,
                        ROW - 8.0,
                        bar.color,
                        x0 + w + 4.0,
                        y + 16.0,
                        esc(&bar.text)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{x0}" y="{}" fill="#868e96">–</text>"##,
                        y + 16.0
                    );
                }
            }
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#868e96">{}</text></svg>"##,
        height - 10.0,
        esc(footer)
    );
    s
}

/// A cell's chart: its throughput and the proxy's CPU per unit, one bar per
/// peer.
pub(crate) fn svg(cell: &Cell, rows: &[&Summary]) -> String {
    let idle = matches!(cell.mode, Mode::Idle { .. });
    type Value = fn(&Summary) -> Option<f64>;
    let rate: Value = |r| r.rate;
    let (second, cost): (String, Value) = if idle {
        ("proxy KiB per tunnel (lower is better)".into(), |r| {
            r.rss_per_tunnel_kib
        })
    } else {
        (
            format!("proxy {} (lower is better)", cell.mode.cpu_unit()),
            |r| r.cpu_per_unit,
        )
    };
    let first = if idle {
        cell.mode.rate_unit().to_string()
    } else {
        format!("{} (higher is better)", cell.mode.rate_unit())
    };
    let panels: Vec<Panel> = [(first, rate), (second, cost)]
        .into_iter()
        .enumerate()
        .map(|(k, (title, value))| Panel {
            title,
            bars: rows
                .iter()
                .map(|r| {
                    let v = value(r);
                    let text = match v {
                        Some(v) if k == 0 => rate_text(&cell.mode, v),
                        Some(v) if idle => format!("{v:.1}"),
                        v => cpu_text(&cell.mode, v),
                    };
                    Bar {
                        label: r.peer.clone(),
                        value: v,
                        text,
                        color: if r.peer.starts_with("splicegate") {
                            "#d9480f"
                        } else if r.peer == "direct" {
                            "#868e96"
                        } else {
                            "#1c7ed6"
                        },
                    }
                })
                .collect(),
        })
        .collect();
    bar_chart(
        &cell.title,
        &panels,
        "medians over rounds; orange: splicegate, grey: no proxy",
    )
}

/// Write report.md, one SVG per cell and results.json into `dir`.
pub(crate) fn write(dir: &Path, meta: &Meta, cells: &[Cell], res: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), markdown(meta, cells, res, true))?;
    for cell in cells {
        let rows: Vec<&Summary> = res.summaries.iter().filter(|s| s.cell == cell.id).collect();
        if !rows.is_empty() {
            std::fs::write(dir.join(format!("{}.svg", cell.id)), svg(cell, &rows))?;
        }
    }
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json(meta, cells, res))?,
    )?;
    Ok(())
}

/// Everything as one JSON value.
pub(crate) fn json(meta: &Meta, cells: &[Cell], res: &Results) -> serde_json::Value {
    serde_json::json!({
        "meta": meta,
        "cells": cells,
        "summaries": res.summaries,
        "skipped": res.skipped,
        "runs": res.runs,
    })
}
