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
        // A new layout's room (another class, or an empty one to take) is
        // looked for by `keep`.
        self.classes
            .iter()
            .find(|(l, _)| *l == layout)
            .is_none_or(|(_, blocks)| blocks.len() < MAX_PER_LAYOUT)
    }

    /// Keeps `block` (see [`Emptied`]), or frees it when there is no room.
    pub(crate) fn keep(&mut self, block: Emptied) {
        let Emptied { layout, ptr } = block;
        if self.has_room(layout) {
            let stored =
                if let Some((_, blocks)) = self.classes.iter_mut().find(|(l, _)| *l == layout) {
                    blocks.push(ptr);
                    true
                } else if self.classes.len() < MAX_LAYOUTS {
                    self.classes.push((layout, vec![ptr]));
                    true
                } else if let Some(class) = self.classes.iter_mut().find(|(_, b)| b.is_empty()) {
                    // A class whose blocks were all taken gives its place (and
                    // its list's memory) to the new layout.
                    class.0 = layout;
                    class.1.push(ptr);
                    true
                } else {
                    false
                };
            if stored {
                self.bytes += layout.size();
                return;
            }
        }
        // SAFETY: `ptr` was allocated by the global allocator with `layout`
        // and holds no value (an `Emptied`'s contract).
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll};

    /// A ready future of `N` bytes: one layout per `N`.
    struct Pad<const N: usize>([u8; N]);

    impl<const N: usize> Future for Pad<N> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
    }

    /// Boxes a `Pad<N>` through the cache and returns its address.
    fn boxed_at<const N: usize>(cache: &mut BoxCache) -> (BoxedTask, usize) {
        let b = cache.boxed(Pad::<N>([7; N]));
        let at = std::ptr::from_ref::<dyn Future<Output = ()>>(&*b).cast::<u8>() as usize;
        (b, at)
    }

    fn keep(cache: &mut BoxCache, b: BoxedTask) {
        cache.keep(empty(b).expect("not zero-sized"));
    }

    #[test]
    fn layouts_are_bounded_and_an_emptied_class_serves_a_new_layout() {
        let mut cache = BoxCache::default();
        macro_rules! one_of_each {
            ($($n:literal)*) => {$(
                let (b, _) = boxed_at::<$n>(&mut cache);
                keep(&mut cache, b);
            )*};
        }
        // Sixteen layouts fill the classes.
        one_of_each!(8 16 24 32 40 48 56 64 72 80 88 96 104 112 120 128);
        assert_eq!(cache.blocks(), MAX_LAYOUTS);
        // A seventeenth is freed, not kept.
        let (b, _) = boxed_at::<136>(&mut cache);
        keep(&mut cache, b);
        assert_eq!(cache.blocks(), MAX_LAYOUTS);
        // The 8-byte block is taken again: its class is now empty, and the
        // seventeenth layout takes its place.
        let (small, _) = boxed_at::<8>(&mut cache);
        assert_eq!(cache.blocks(), MAX_LAYOUTS - 1);
        let (b, at) = boxed_at::<136>(&mut cache);
        keep(&mut cache, b);
        assert_eq!(cache.blocks(), MAX_LAYOUTS);
        let (again, at_again) = boxed_at::<136>(&mut cache);
        assert_eq!(at_again, at, "the kept block served the same layout");
        drop((small, again));
        // Bytes are accounted block by block.
        assert_eq!(cache.bytes, (8..=128).step_by(8).sum::<usize>() - 8);
    }
}
