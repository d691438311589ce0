//! `splicegate-agent`: the device side of an agent node, standalone.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let args = splicegate_agent::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPLICEGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(splicegate_agent::main_with(args));
}
