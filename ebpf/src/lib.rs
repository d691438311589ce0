//! Kernel enforcement for splicegate (issue: eBPF programs).
//!
//! This crate will hold the XDP and TC programs (C, built with clang-19), the
//! ABI header they share with Rust, and the aya loader that attaches them and
//! writes their maps. Until then it only names the verdicts the programs will
//! count, so the rest of the workspace can refer to them.
#![forbid(unsafe_code)]

/// What the kernel programs decide for a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the packet through to the socket layer.
    Pass,
    /// New connection above the source's rate.
    DropRate,
    /// Source not on an `ip_only` listener's allowlist.
    DropNotAllowed,
    /// Source banned for repeated authentication failures.
    DropBanned,
}
