//! Flush latency of the usage ledger: N packages with traffic every round,
//! one transaction per flush, on a store file in the temp directory, or on
//! PostgreSQL when a connection string is given as the third argument.
//!
//! `cargo run --release -p splicegate-admin --example flush_bench -- 10000 30`
//! `cargo run --release -p splicegate-admin --example flush_bench -- 10000 30 "host=/tmp/pg user=postgres dbname=bench"`

use std::time::Instant;

use splicegate_admin::{Control, ControlOptions};
use splicegate_control::Now;
use splicegate_control::policy::{Declarations, OrgDecl, PackageDecl};

fn clock() -> Now {
    Now::from_secs(1)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let packages: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let url = args.next();
    let path =
        std::env::temp_dir().join(format!("splicegate-flush-bench-{}.db", std::process::id()));
    let mut decls = Declarations {
        orgs: vec![OrgDecl {
            id: "bench".into(),
            credits: 1_000_000_000_000,
            from_file: true,
        }],
        ..Declarations::default()
    };
    for id in 1..=packages {
        let mut p = PackageDecl::new(id, &format!("pk_{id}"));
        p.org = Some("bench".into());
        p.price_per_gb = 1_000_000;
        p.from_file = true;
        decls.packages.push(p);
    }
    let control = Control::open(
        ControlOptions {
            gateway_id: "local".into(),
            snapshot: None,
            store: match &url {
                Some(u) => splicegate_admin::StoreLocation::Postgres(u.clone()),
                None => splicegate_admin::StoreLocation::Sqlite(path.clone()),
            },
            session_capacity: 16,
            clock,
        },
        decls,
    )
    .expect("open the store");
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        {
            let policy = control.engine().policy();
            for p in policy.packages.values() {
                p.charge(1000 + round as u64, 100_000);
                p.usage.count_request();
            }
        }
        let t = Instant::now();
        let f = control.flush().expect("flush");
        times.push(t.elapsed());
        assert_eq!(f.rows as u64, packages);
    }
    times.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{} {packages} packages, {rounds} flushes: p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        if url.is_some() { "postgres" } else { "sqlite" },
        ms(times[rounds / 2]),
        ms(times[rounds * 9 / 10]),
        ms(times[rounds - 1])
    );
    drop(control);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
