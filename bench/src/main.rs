//! splicegate-bench: the load harness (targets, load modes, peers side by side).
fn main() {}
