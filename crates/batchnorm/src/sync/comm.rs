//! The communicator abstraction: rank, size, all-gather, barrier; all-reduce built on all-gather
//! with a fixed summation order.

use crate::Error;

/// A group of `size` workers, this one being `rank` (0-based), that exchange slices collectively.
///
/// Every collective must be called by every rank of the group, in the same order, with the same
/// slice lengths; a rank that fails before a collective leaves the others waiting in it (an MPI
/// launcher then ends the job; [`crate::ThreadComm`] reports the failure to the other ranks).
pub trait Communicator: Send + Sync {
    /// This worker's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of workers.
    fn size(&self) -> usize;
    /// All-gather: every rank contributes `send` (the same length on every rank); `recv`
    /// (`size() · send.len()` values) receives all contributions in rank order.
    ///
    /// Rejects a `recv` of the wrong length ([`Error::BufferLength`]) and a failure of the
    /// transport or contributions of different lengths ([`Error::Communication`]).
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error>;
    /// [`Communicator::all_gather_f64`] for `f32` values.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error>;
    /// Waits until every rank has reached the barrier. Rejects a transport failure.
    fn barrier(&self) -> Result<(), Error>;

    /// All-reduce (sum) in place, deterministic: gathers every rank's `buf` and adds them in rank
    /// order, so every rank ends with the same bits. Rejects what the all-gather rejects.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), Error> {
        let mut all = vec![0.0; buf.len() * self.size()];
        self.all_gather_f64(buf, &mut all)?;
        sum_in_rank_order(&all, buf, |v| v);
        Ok(())
    }

    /// All-reduce (sum) of `f32` values, accumulated in `f64` in rank order and rounded once.
    /// Rejects what the all-gather rejects.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), Error> {
        let mut all = vec![0.0; buf.len() * self.size()];
        self.all_gather_f32(buf, &mut all)?;
        sum_in_rank_order(&all, buf, |v| v as f32);
        Ok(())
    }
}

/// Forwards every method to the communicator behind a pointer.
macro_rules! forward_communicator {
    ($($ptr:ty),*) => {$(
        impl<C: Communicator + ?Sized> Communicator for $ptr {
            fn rank(&self) -> usize {
                (**self).rank()
            }
            fn size(&self) -> usize {
                (**self).size()
            }
            fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
                (**self).all_gather_f64(send, recv)
            }
            fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
                (**self).all_gather_f32(send, recv)
            }
            fn barrier(&self) -> Result<(), Error> {
                (**self).barrier()
            }
        }
    )*};
}

// A borrowed, boxed or shared communicator is one (e.g. to wrap it in [`crate::Counted`]).
forward_communicator!(&C, Box<C>, std::sync::Arc<C>);

/// `out[i] = Σ_r all[r·n + i]`, summed in f64 from rank 0 upwards.
fn sum_in_rank_order<T: Copy + Into<f64>>(all: &[T], out: &mut [T], round: impl Fn(f64) -> T) {
    let n = out.len();
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0f64;
        for r in 0..all.len() / n.max(1) {
            acc += all[r * n + i].into();
        }
        *o = round(acc);
    }
}

/// Checks the receive buffer of an all-gather, for implementors of [`Communicator`]: rejects a
/// `recv` length other than `size · send` ([`Error::BufferLength`]).
pub fn check_gather(size: usize, send: usize, recv: usize) -> Result<(), Error> {
    let expected = size.checked_mul(send).ok_or_else(|| Error::Communication {
        message: format!("{size} ranks × {send} values overflow"),
    })?;
    if recv != expected {
        return Err(Error::BufferLength {
            name: "recv",
            expected,
            actual: recv,
        });
    }
    Ok(())
}

/// The group of one: every collective is a copy. Synchronized batch norm over it is ordinary
/// batch norm (the same code path, nothing to merge).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
        check_gather(1, send.len(), recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        check_gather(1, send.len(), recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn barrier(&self) -> Result<(), Error> {
        Ok(())
    }
}
