//! An in-process communicator: `size` threads of one process exchange slices through shared
//! memory. For tests of synchronized batch norm without MPI, and for data-parallel work on threads.

use super::comm::check_gather;
use super::Communicator;
use crate::Error;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One rank of an in-process group made by [`ThreadComm::group`]; move each to its own thread.
///
/// Every collective is two rendezvous: all ranks deposit their slice, then all read every slice.
/// When a rank is dropped (its thread finished or panicked) while others wait in a collective,
/// they get [`Error::Communication`] instead of waiting forever.
#[derive(Debug)]
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    /// Each rank's contribution to the current collective (f32 values are stored widened, exactly).
    slots: Vec<Vec<f64>>,
    /// Ranks that reached the current rendezvous.
    arrived: usize,
    /// Completed rendezvous.
    generation: u64,
    /// A rank has been dropped: no collective can complete any more.
    departed: bool,
}

fn broken() -> Error {
    Error::Communication {
        message: "another rank of the thread group has gone (finished or panicked)".into(),
    }
}

impl ThreadComm {
    /// The `size` ranks of a new group, in rank order. Rejects `size == 0` ([`Error::Communication`]).
    pub fn group(size: usize) -> Result<Vec<ThreadComm>, Error> {
        if size == 0 {
            return Err(Error::Communication {
                message: "a group needs at least one rank".into(),
            });
        }
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(State {
                slots: vec![Vec::new(); size],
                arrived: 0,
                generation: 0,
                departed: false,
            }),
            changed: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, Error> {
        self.shared.state.lock().map_err(|_| broken())
    }

    /// Arrives at a rendezvous and waits until every rank has arrived.
    fn rendezvous<'a>(&'a self, mut st: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>, Error> {
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.size {
            st.arrived = 0;
            st.generation += 1;
            self.shared.changed.notify_all();
            return Ok(st);
        }
        while st.generation == gen {
            if st.departed {
                return Err(broken());
            }
            st = self.shared.changed.wait(st).map_err(|_| broken())?;
        }
        Ok(st)
    }

    /// The all-gather on widened values.
    fn gather(&self, send: Vec<f64>, recv_len: usize, mut store: impl FnMut(usize, &[f64])) -> Result<(), Error> {
        check_gather(self.shared.size, send.len(), recv_len)?;
        let n = send.len();
        let mut st = self.lock()?;
        if st.departed {
            return Err(broken());
        }
        st.slots[self.rank] = send;
        st = self.rendezvous(st)?;
        // Every rank sees the same slots, so every rank takes the same branch here.
        let same = st.slots.iter().all(|s| s.len() == n);
        if same {
            for (r, s) in st.slots.iter().enumerate() {
                store(r * n, s);
            }
        }
        // Nobody may overwrite a slot before every rank has read them all.
        drop(self.rendezvous(st)?);
        if !same {
            return Err(Error::Communication {
                message: "ranks contributed slices of different lengths to an all-gather".into(),
            });
        }
        Ok(())
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
        let len = recv.len();
        self.gather(send.to_vec(), len, |at, s| recv[at..at + s.len()].copy_from_slice(s))
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        let len = recv.len();
        let wide = send.iter().map(|&v| v as f64).collect();
        self.gather(wide, len, |at, s| {
            recv[at..at + s.len()]
                .iter_mut()
                .zip(s)
                .for_each(|(o, &v)| *o = v as f32)
        })
    }
    fn barrier(&self) -> Result<(), Error> {
        let st = self.lock()?;
        if st.departed {
            return Err(broken());
        }
        drop(self.rendezvous(st)?);
        Ok(())
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        // Poisoned or not, mark the group broken and wake every waiter.
        let mut st = match self.shared.state.lock() {
            Ok(st) => st,
            Err(poisoned) => poisoned.into_inner(),
        };
        st.departed = true;
        self.shared.changed.notify_all();
    }
}
