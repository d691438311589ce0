//! The bits of rtnetlink the legacy TC attachment needs and aya 0.14 lacks:
//! whether filters remain on a `clsact` qdisc, and deleting the qdisc.
//!
//! Used only where TCX links are unavailable (kernels before 6.6), where a
//! TC program hangs off a `clsact` qdisc that [`crate::Enforcer`] may have had
//! to create, and must then remove — unless someone else's filters use it.

use std::io;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

const NLMSG_HDR_LEN: usize = 16;
const TCMSG_LEN: usize = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;

/// `TC_H_CLSACT` (== `TC_H_INGRESS`): the parent of a clsact qdisc.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
/// `TC_H_MAKE(TC_H_CLSACT, 0)`: the handle of a clsact qdisc.
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` / `..._EGRESS`.
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;

/// Bound on the datagrams read for one request (a dump of a busy qdisc spans
/// a few; more means something is wrong).
const MAX_RECVS: usize = 256;

fn tc_request(
    ty: u16,
    flags: u16,
    ifindex: u32,
    handle: u32,
    parent: u32,
    kind: Option<&str>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set below
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
    // struct tcmsg
    b.push(0); // AF_UNSPEC
    b.extend_from_slice(&[0, 0, 0]);
    b.extend_from_slice(&ifindex.to_ne_bytes());
    b.extend_from_slice(&handle.to_ne_bytes());
    b.extend_from_slice(&parent.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // tcm_info
    debug_assert_eq!(b.len(), NLMSG_HDR_LEN + TCMSG_LEN);
    if let Some(kind) = kind {
        let nla_len = 4 + kind.len() + 1;
        b.extend_from_slice(&u16::try_from(nla_len).unwrap_or(u16::MAX).to_ne_bytes());
        b.extend_from_slice(&TCA_KIND.to_ne_bytes());
        b.extend_from_slice(kind.as_bytes());
        b.push(0);
        b.resize(b.len().next_multiple_of(4), 0);
    }
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    b[..4].copy_from_slice(&len.to_ne_bytes());
    b
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed rtnetlink reply")
}

/// Sends `req` and reads the replies until an ACK, an error or the end of a
/// dump. Returns how many messages of type `count_type` arrived.
fn transact(req: &[u8], count_type: u16) -> io::Result<usize> {
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)?; // protocol 0: NETLINK_ROUTE
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(2)),
    )?;
    rustix::net::send(&fd, req, SendFlags::empty())?;
    let mut buf = vec![0u8; 32 * 1024];
    let mut counted = 0;
    for _ in 0..MAX_RECVS {
        let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
        let mut at = 0;
        while at + NLMSG_HDR_LEN <= n {
            let len = read_u32(&buf, at).ok_or_else(malformed)? as usize;
            let ty = read_u16(&buf, at + 4).ok_or_else(malformed)?;
            if len < NLMSG_HDR_LEN || at + len > n {
                return Err(malformed());
            }
            match ty {
                NLMSG_ERROR | NLMSG_DONE => {
                    let code = read_u32(&buf, at + NLMSG_HDR_LEN).map_or(0, |c| c.cast_signed());
                    return if code == 0 {
                        Ok(counted)
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                t if t == count_type => counted += 1,
                _ => {}
            }
            at += len.next_multiple_of(4);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "rtnetlink reply did not end",
    ))
}

/// How many TC filters hang off the interface's clsact qdisc (ingress and
/// egress together).
pub(crate) fn clsact_filter_count(ifindex: u32) -> io::Result<usize> {
    let mut total = 0;
    for parent in [CLSACT_INGRESS, CLSACT_EGRESS] {
        let req = tc_request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, None);
        total += transact(&req, RTM_NEWTFILTER)?;
    }
    Ok(total)
}

/// Deletes the interface's clsact qdisc (and with it any filter on it).
pub(crate) fn clsact_delete(ifindex: u32) -> io::Result<()> {
    let req = tc_request(
        RTM_DELQDISC,
        NLM_F_ACK,
        ifindex,
        CLSACT_HANDLE,
        TC_H_CLSACT,
        Some("clsact"),
    );
    transact(&req, 0).map(drop)
}
