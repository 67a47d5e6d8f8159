//! The MPI communicator (cargo feature `mpi`, over rsmpi): `MPI_COMM_WORLD` of an `mpirun` launch.

use batchnorm::{check_gather, Communicator, Error};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives};
use mpi::Threading;
use std::sync::Mutex;

/// `MPI_COMM_WORLD`. Owns the MPI environment: MPI is finalized when it is dropped.
///
/// MPI is initialized with `MPI_THREAD_SERIALIZED`: collectives may come from any thread (the
/// training loop runs on a rayon worker), one at a time, which the lock enforces.
pub struct MpiComm {
    rank: usize,
    size: usize,
    serial: Mutex<()>,
    _universe: Universe,
}

impl MpiComm {
    /// Initializes MPI and returns the world communicator. Outside `mpirun` that is a world of
    /// one process. Rejects a second initialization and an MPI library that cannot serialize
    /// calls from several threads.
    pub fn init() -> anyhow::Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| anyhow::anyhow!("MPI is already initialized"))?;
        anyhow::ensure!(
            matches!(threading, Threading::Serialized | Threading::Multiple),
            "the MPI library does not support MPI_THREAD_SERIALIZED (got {threading:?})"
        );
        let world = universe.world();
        Ok(MpiComm {
            rank: world.rank() as usize,
            size: world.size() as usize,
            serial: Mutex::new(()),
            _universe: universe,
        })
    }

    fn world(&self) -> Result<(std::sync::MutexGuard<'_, ()>, SimpleCommunicator), Error> {
        let guard = self.serial.lock().map_err(|_| Error::Communication {
            message: "a thread panicked inside an MPI call".into(),
        })?;
        Ok((guard, SimpleCommunicator::world()))
    }
}

/// Ends every process of the job with `code` (`MPI_Abort`): what a rank does when it fails, so
/// that the others do not wait for it in a collective. Only valid while MPI is initialized (an
/// [`MpiComm`] exists).
pub fn abort_job(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
        check_gather(self.size, send.len(), recv.len())?;
        let (_serial, world) = self.world()?;
        // MPI's default error handler (MPI_ERRORS_ARE_FATAL) ends the job on a transport failure.
        world.all_gather_into(send, recv);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), Error> {
        check_gather(self.size, send.len(), recv.len())?;
        let (_serial, world) = self.world()?;
        world.all_gather_into(send, recv);
        Ok(())
    }
    fn barrier(&self) -> Result<(), Error> {
        let (_serial, world) = self.world()?;
        world.barrier();
        Ok(())
    }
}
