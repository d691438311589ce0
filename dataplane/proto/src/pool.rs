//! Per-thread free lists of emptied buffers, for values that give their
//! memory back when dropped (a head's fields and texts here, a worker's
//! byte buffers): a warm thread reuses them instead of allocating.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread's free list of `T`.
pub type FreeList<T> = LocalKey<RefCell<Vec<T>>>;

/// One kept value, if the thread has one (none while the thread's locals
/// are being torn down).
pub fn take<T: 'static>(list: &'static FreeList<T>) -> Option<T> {
    list.try_with(|l| l.borrow_mut().pop()).ok().flatten()
}

/// Keeps `value` for the thread's next [`take`], unless `max` are kept
/// already (then it is dropped).
pub fn give<T: 'static>(list: &'static FreeList<T>, value: T, max: usize) {
    let rejected = list
        .try_with(|l| {
            let mut l = l.borrow_mut();
            if l.len() < max {
                l.push(value);
                None
            } else {
                Some(value)
            }
        })
        .ok()
        .flatten();
    // Dropped outside the borrow.
    drop(rejected);
}
