//! `splicegate-agent`: the device side of an agent node, standalone.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    // A bad command line exits 1: status 2 means the gateway refused the key.
    let args = match splicegate_agent::Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 1 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPLICEGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(splicegate_agent::main_with(args));
}
