//! A communicator wrapper that counts collective calls and bytes (for the communication figures).

use super::Communicator;
use crate::Error;
use std::sync::atomic::{AtomicU64, Ordering};

/// Collective calls and bytes seen by one rank since the last [`Counted::take`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Collective calls (all-gathers and barriers; an all-reduce is one all-gather).
    pub calls: u64,
    /// Bytes this rank contributed.
    pub bytes_sent: u64,
    /// Bytes this rank received (its own contribution included, as in an all-gather's buffer).
    pub bytes_received: u64,
}

/// Wraps a communicator and counts its traffic; behaves exactly like the wrapped one.
#[derive(Debug, Default)]
pub struct Counted<C> {
    inner: C,
    calls: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

impl<C: Communicator> Counted<C> {
    /// Counts the traffic of `inner`.
    pub fn new(inner: C) -> Self {
        Counted {
            inner,
            calls: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    /// The traffic since the previous call (or since creation), resetting the counters.
    pub fn take(&self) -> Traffic {
        Traffic {
            calls: self.calls.swap(0, Ordering::Relaxed),
            bytes_sent: self.sent.swap(0, Ordering::Relaxed),
            bytes_received: self.received.swap(0, Ordering::Relaxed),
        }
    }

    /// The wrapped communicator.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn note(&self, sent: usize, received: usize, bytes: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.sent.fetch_add((sent * bytes) as u64, Ordering::Relaxed);
        self.received.fetch_add((received * bytes) as u64, Ordering::Relaxed);
    }
}

impl<C: Communicator> Communicator for Counted<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
        self.note(send.len(), recv.len(), 8);
        self.inner.all_gather_f64(send, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        self.note(send.len(), recv.len(), 4);
        self.inner.all_gather_f32(send, recv)
    }
    fn barrier(&self) -> Result<(), Error> {
        self.note(0, 0, 0);
        self.inner.barrier()
    }
}
