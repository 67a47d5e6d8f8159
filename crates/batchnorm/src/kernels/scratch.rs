//! Reusable per-thread buffers for the kernels' per-channel temporaries (constants, partial
//! sums, block statistics).
//!
//! A training loop calls the kernels again and again with the same channel counts. Allocating
//! these temporaries afresh on every call (tens of KiB each for wide layers) lets the system
//! allocator hand the pages back between calls and fault them in again: glibc trims the heap
//! top above 128 KiB, and on a multi-threaded process every trim is a TLB shootdown (what that
//! cost on wide layers: `docs/tuning-log.md`). A [`Scratch`]
//! takes a buffer from the current thread's pool and gives it back to the pool of the thread
//! that drops it; each pool keeps at most [`MAX_POOLED`] buffers of at most
//! [`MAX_POOLED_BYTES`] each.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers kept per thread and element type.
pub(crate) const MAX_POOLED: usize = 16;
/// Larger buffers are freed, not kept: their allocation cost is small next to the work they
/// serve, and a pool should not hold on to memory of that size.
pub(crate) const MAX_POOLED_BYTES: usize = 4 << 20;

/// Element types with a per-thread pool.
pub(crate) trait Pooled: Copy + 'static {
    /// Runs `f` on this thread's pool; `None` while the pool is in use or being torn down.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}

macro_rules! pooled {
    ($($t:ty),*) => {$(
        impl Pooled for $t {
            fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
                thread_local!(static POOL: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) });
                POOL.try_with(|p| p.try_borrow_mut().ok().map(|mut p| f(&mut p))).ok().flatten()
            }
        }
    )*};
}
pooled!(f64, f32, u32, super::elementwise::DxCoeffs);

/// A `Vec` taken from the current thread's pool and given back when dropped.
pub(crate) struct Scratch<T: Pooled>(Vec<T>);

impl<T: Pooled> Scratch<T> {
    /// The first buffer of this thread's pool with room for `cap` elements (else the last one
    /// kept, which the caller grows), as its last user left it; a new empty one if the pool is
    /// empty.
    fn take(cap: usize) -> Vec<T> {
        let reused = T::with_pool(|pool| {
            let fit = pool.iter().position(|v| v.capacity() >= cap);
            fit.or(pool.len().checked_sub(1)).map(|i| pool.swap_remove(i))
        });
        reused.flatten().unwrap_or_default()
    }

    /// An empty buffer with room for at least `cap` elements.
    pub fn with_capacity(cap: usize) -> Scratch<T> {
        let mut v = Scratch::take(cap);
        v.clear();
        v.reserve(cap);
        Scratch(v)
    }

    /// `len` values, whatever an earlier user left there (`T::default()` where the buffer
    /// grows): for callers that write every entry before they read it, without paying for a fill.
    pub fn any(len: usize) -> Scratch<T>
    where
        T: Default,
    {
        let mut v = Scratch::take(len);
        v.truncate(len);
        v.resize(len, T::default());
        Scratch(v)
    }

    /// The items of `iter`, in order.
    pub fn collect(iter: impl ExactSizeIterator<Item = T>) -> Scratch<T> {
        let mut s = Scratch::with_capacity(iter.len());
        s.0.extend(iter);
        s
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() > 0 && v.capacity() * std::mem::size_of::<T>() <= MAX_POOLED_BYTES {
            T::with_pool(|pool| {
                if pool.len() < MAX_POOLED {
                    pool.push(v);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_start_as_asked() {
        let first = Scratch::<f64>::collect(std::iter::repeat_n(1.5, 1000));
        let ptr = first.as_ptr();
        assert!(first.iter().all(|&v| v == 1.5) && first.len() == 1000);
        drop(first);
        // The same allocation comes back, emptied and refilled.
        let again = Scratch::<f64>::collect(std::iter::repeat_n(0.0, 10));
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(&again[..], &[0.0; 10]);
        // `any` keeps what the last user left.
        drop(again);
        let kept = Scratch::<f64>::any(12);
        assert_eq!(kept.as_ptr(), ptr);
        assert_eq!(&kept[..], &[0.0; 12]);
        // While it is taken, another request gets another buffer.
        let other = Scratch::<f64>::collect([1.0, 2.0].into_iter());
        assert_ne!(other.as_ptr(), ptr);
        assert_eq!(&other[..], &[1.0, 2.0]);
    }

    #[test]
    fn pool_is_bounded() {
        let many: Vec<_> = (0..MAX_POOLED + 5).map(|_| Scratch::<f32>::any(4)).collect();
        drop(many);
        assert_eq!(f32::with_pool(|p| p.len()), Some(MAX_POOLED));
        drop(Scratch::<f64>::any(MAX_POOLED_BYTES / 8 + 1));
        assert_eq!(f64::with_pool(|p| p.len()), Some(0));
    }
}
