//! Byte buffers a connection borrows from its worker and gives back.
//!
//! Each client connection reads its first head into a buffer and writes its
//! answers from another; with a new pair per connection a CONNECT paid two
//! allocations for them. A [`Buf`] goes back to its thread's pool when it
//! is dropped (cleared, and only when its capacity is ordinary: at least
//! [`MIN`], at most [`MAX`]), and [`Buf::take`] serves from that pool. The
//! pool is per thread (a worker is one), bounded by [`KEPT`] buffers.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// The capacity a buffer from the pool has at least: a typical request head.
pub(crate) const MIN: usize = 1024;
/// Larger buffers (a long head, a big answer) are freed, not kept.
pub(crate) const MAX: usize = 4096;
/// Buffers a thread keeps at most (1 MiB of them at [`MAX`]).
pub(crate) const KEPT: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A `Vec<u8>` that goes back to its thread's pool when dropped.
#[derive(Debug, Default)]
pub(crate) struct Buf(Vec<u8>);

impl Buf {
    /// An empty buffer with room for at least [`MIN`] bytes: a kept one
    /// when the pool has one.
    pub(crate) fn take() -> Buf {
        Buf(splicegate_proto::pool::take(&FREE).unwrap_or_else(|| Vec::with_capacity(MIN)))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let cap = self.0.capacity();
        if !(MIN..=MAX).contains(&cap) {
            return;
        }
        let mut v = std::mem::take(&mut self.0);
        v.clear();
        splicegate_proto::pool::give(&FREE, v, KEPT);
    }
}

impl Deref for Buf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_goes_back_to_the_pool_cleared_and_is_served_again() {
        let mut a = Buf::take();
        assert!(a.is_empty() && a.capacity() >= MIN);
        a.extend_from_slice(b"CONNECT x:1 HTTP/1.1\r\n\r\n");
        let ptr = a.as_ptr();
        drop(a);
        let b = Buf::take();
        assert_eq!(b.as_ptr(), ptr, "the dropped buffer is served again");
        assert!(b.is_empty(), "served cleared: {b:?}");
        // One grown past MAX is freed, not kept.
        let kept = || FREE.with(|f| f.borrow().len());
        let mut big = b;
        big.reserve(MAX * 2);
        let before = kept();
        drop(big);
        assert_eq!(kept(), before, "a buffer grown past MAX was kept");
        // An empty one has no memory and is not kept; an ordinary one is.
        drop(Buf::default());
        assert_eq!(kept(), before);
        drop(Buf::take());
        assert_eq!(kept(), before + 1);
    }
}
