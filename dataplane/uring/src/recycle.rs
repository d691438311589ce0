//! A finished task's future box, kept for the next task of the same layout.
//!
//! A worker spawns a task per connection (and one per tunnel), each a
//! future of the same few types: boxing each anew is an allocation and a
//! free per connection. The runtime instead drops a finished future in
//! place and keeps its memory, by layout, for the next future of that
//! layout, as HAProxy's pools keep a stream's memory. The cache is bounded
//! ([`MAX_BYTES`], [`MAX_PER_LAYOUT`], [`MAX_LAYOUTS`]); what does not fit
//! is freed at once.

use std::alloc::Layout;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;

/// A spawned task's future.
pub(crate) type BoxedTask = Pin<Box<dyn Future<Output = ()>>>;

/// Bytes of finished futures one runtime keeps at most.
pub(crate) const MAX_BYTES: usize = 4 << 20;
/// Blocks kept per layout at most.
pub(crate) const MAX_PER_LAYOUT: usize = 1024;
/// Distinct layouts kept at most.
pub(crate) const MAX_LAYOUTS: usize = 16;

/// Memory of finished futures, by layout: every block was allocated by the
/// global allocator with its class's layout, and holds no value.
#[derive(Debug, Default)]
pub(crate) struct BoxCache {
    classes: Vec<(Layout, Vec<NonNull<u8>>)>,
    bytes: usize,
}

impl BoxCache {
    /// `future` in a box: a kept block of its layout when there is one.
    pub(crate) fn boxed<F: Future<Output = ()> + 'static>(&mut self, future: F) -> BoxedTask {
        let layout = Layout::new::<F>();
        let Some(block) = self.take(layout) else {
            return Box::pin(future);
        };
        let ptr = block.cast::<F>().as_ptr();
        // SAFETY: the block was allocated by the global allocator with a
        // layout equal to `Layout::new::<F>()` (its class's; `take` matched
        // it), holds no value (`keep` only takes blocks whose value was
        // dropped) and belongs to no one else (taken out of the cache): it
        // is exactly what `Box::<F>::from_raw` requires once written.
        unsafe {
            ptr.write(future);
            Box::into_pin(Box::from_raw(ptr))
        }
    }

    fn take(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let (_, blocks) = self.classes.iter_mut().find(|(l, _)| *l == layout)?;
        let block = blocks.pop()?;
        self.bytes -= layout.size();
        Some(block)
    }

    /// Whether a block of `layout` would be kept.
    fn has_room(&self, layout: Layout) -> bool {
        if layout.size() == 0 || self.bytes + layout.size() > MAX_BYTES {
            return false;
        }
        match self.classes.iter().find(|(l, _)| *l == layout) {
            Some((_, blocks)) => blocks.len() < MAX_PER_LAYOUT,
            None => self.classes.len() < MAX_LAYOUTS,
        }
    }

    /// Keeps `block` (see [`Emptied`]).
    pub(crate) fn keep(&mut self, block: Emptied) {
        let Emptied { layout, ptr } = block;
        if !self.has_room(layout) {
            // SAFETY: `ptr` was allocated by the global allocator with
            // `layout` and holds no value (an `Emptied`'s contract).
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
            return;
        }
        self.bytes += layout.size();
        match self.classes.iter_mut().find(|(l, _)| *l == layout) {
            Some((_, blocks)) => blocks.push(ptr),
            None => self.classes.push((layout, vec![ptr])),
        }
    }

    /// Blocks kept, for tests.
    #[cfg(test)]
    pub(crate) fn blocks(&self) -> usize {
        self.classes.iter().map(|(_, b)| b.len()).sum()
    }
}

impl Drop for BoxCache {
    fn drop(&mut self) {
        for (layout, blocks) in self.classes.drain(..) {
            for ptr in blocks {
                // SAFETY: every kept block was allocated by the global
                // allocator with its class's layout and holds no value.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
            }
        }
    }
}

/// A finished future's memory, its value dropped: allocated by the global
/// allocator with `layout`, owned by no one but this.
#[derive(Debug)]
pub(crate) struct Emptied {
    layout: Layout,
    ptr: NonNull<u8>,
}

/// Drops `future` in place and returns its memory, or drops it whole (a
/// zero-sized future has no memory). Called outside any borrow of the
/// runtime: the future's drop may cancel ops, wake or spawn tasks.
pub(crate) fn empty(future: BoxedTask) -> Option<Emptied> {
    let layout = Layout::for_value(&*future);
    if layout.size() == 0 {
        return None;
    }
    // SAFETY: the value is never moved out of its memory: it is dropped
    // where it is, so the pinning contract (drop before the memory is
    // reused) holds.
    let raw = Box::into_raw(unsafe { Pin::into_inner_unchecked(future) });
    // If the drop unwinds, the block leaks: it is never freed twice.
    // SAFETY: `raw` came from a live `Box` just given up, so it points at a
    // valid value that nothing else will drop.
    unsafe { std::ptr::drop_in_place(raw) };
    NonNull::new(raw.cast::<u8>()).map(|ptr| Emptied { layout, ptr })
}
