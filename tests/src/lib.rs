//! End-to-end test support: starting the real binary, targets, test nodes.
#![forbid(unsafe_code)]
