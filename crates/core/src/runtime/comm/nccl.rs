//! NCCL between CUDA devices (within a node over NVLink/PCIe, across nodes over InfiniBand or
//! sockets: NCCL picks its transport). libnccl is loaded at run time like the driver and NVRTC
//! (from the system, or PyPI's `nvidia-nccl-cu12` with its lib folder on `LD_LIBRARY_PATH`).
//! The job is bootstrapped over [`Tcp`]: rank 0 makes NCCL's unique id and broadcasts it through
//! the master address, which also carries each step's batch. A collective is polled with NCCL's
//! asynchronous error query and ended with `ncclCommAbort` after the step timeout, so a dead
//! peer ends the job instead of hanging it.
//!
//! The all-reduce here runs on a device staging buffer (host values in, sum out); the runtime's
//! partial sums are read back from the device first. Reducing the runtime's own device buffers
//! in its stream is the next step for speed (unverified on hardware: no GPU has run this file).

use super::{step_timeout, Communicator, Launch, Tcp};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{result, sys};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Library names tried besides cudarc's own (`libnccl.so`, ...): the wheel and distribution
/// packages install the versioned name only.
const VERSIONED: &[&str] = &["libnccl.so.2"];

/// Whether libnccl can be loaded (under cudarc's names; see [`Nccl::connect`] for the
/// versioned one).
pub fn present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { sys::is_culib_present() }
}

pub struct Nccl {
    tcp: Tcp,
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    staging: Mutex<Option<CudaSlice<f32>>>,
    timeout: Duration,
    device: usize,
}

// SAFETY: the communicator handle is used under `staging`'s lock only (one collective at a
// time), which NCCL allows from any thread.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins `launch`'s job on CUDA device `LOCAL_RANK`: the TCP bootstrap, then NCCL.
    pub fn connect(launch: &Launch) -> Result<Nccl> {
        let device = launch.local_rank;
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::device(format!("NCCL rank {} (CUDA device {device})", launch.rank), what, e);
        let version = load_library()?;
        if !crate::backend::cuda::driver_present() {
            return Err(Error::NoDevice(format!(
                "NCCL {version} loaded, but the NVIDIA driver (libcuda) could not be: NCCL needs NVIDIA GPUs (use --devices with wgpu adapters, or the TCP transport, DSRUN_COMM=tcp)"
            )));
        }
        let context = CudaContext::new(device).map_err(|e| fail("opening the device", &e))?;
        let stream = context.default_stream();
        let tcp = Tcp::connect(launch)?;
        let mut id = Vec::new();
        if launch.rank == 0 {
            let unique = result::get_uniqueid().map_err(|e| fail("ncclGetUniqueId", &format!("{e:?}")))?;
            id = unique.internal.iter().map(|&c| c as u8).collect();
        }
        tcp.broadcast(&mut id)?;
        let Ok(internal) = <[u8; 128]>::try_from(&id[..]) else {
            return Err(fail("the unique id from rank 0", &format!("{} bytes, expected 128", id.len())));
        };
        let unique = sys::ncclUniqueId { internal: internal.map(|b| b as std::ffi::c_char) };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; world and rank were checked by Launch.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), launch.world as i32, unique, launch.rank as i32).map_err(|e| fail("ncclCommInitRank", &format!("{e:?}")))?;
            comm.assume_init()
        };
        Ok(Nccl { tcp, comm, stream, staging: Mutex::new(None), timeout: step_timeout(), device })
    }

    /// Waits for the stream's collective, checking NCCL's asynchronous error; aborts the
    /// communicator after the timeout.
    fn wait(&self) -> Result<()> {
        let event = self.stream.record_event(None).map_err(|e| Error::device(self.describe(), "recording an event", e))?;
        let started = Instant::now();
        while !event.is_complete() {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if state != sys::ncclResult_t::ncclSuccess && state != sys::ncclResult_t::ncclInProgress {
                // SAFETY: ends every pending operation on the communicator.
                unsafe { sys::ncclCommAbort(self.comm) };
                return Err(Error::Rank { rank: self.rank(), world: self.world(), reason: format!("NCCL reported {state:?} (a peer failed or a link broke)") });
            }
            if started.elapsed() > self.timeout {
                unsafe { sys::ncclCommAbort(self.comm) };
                return Err(Error::Rank {
                    rank: self.rank(),
                    world: self.world(),
                    reason: format!("an NCCL all-reduce did not finish within {:.0} s (DSRUN_COMM_TIMEOUT)", self.timeout.as_secs_f64()),
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }
}

/// Loads libnccl (cudarc's names; where only the versioned file is installed, says how to make
/// it visible) and returns its version ("2.21.5"), or says how to get it.
pub fn load_library() -> Result<String> {
    if present() {
        let code = result::get_nccl_version().map_err(|e| Error::device("NCCL", "ncclGetVersion", format!("{e:?}")))?;
        return Ok(format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100));
    }
    // SAFETY: loading a library runs its initialisers; libnccl's are benign.
    let versioned = VERSIONED.iter().any(|name| unsafe { libloading::Library::new(*name) }.is_ok());
    let hint = if versioned {
        "libnccl.so.2 is installed but cudarc loads libnccl.so: add a link `ln -s libnccl.so.2 libnccl.so` in its folder (on LD_LIBRARY_PATH)"
    } else {
        "install NCCL (the system's libnccl2, or `pip install nvidia-nccl-cu12` and put its nvidia/nccl/lib on LD_LIBRARY_PATH with a libnccl.so link to libnccl.so.2)"
    };
    Err(Error::NoDevice(format!("NCCL: libnccl could not be loaded; {hint}; or join the ranks without NCCL (DSRUN_COMM=tcp)")))
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world(&self) -> usize {
        self.tcp.world()
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let describe = self.describe();
        let fail = |what: &str, e: &dyn std::fmt::Debug| Error::device(describe.clone(), what, format!("{e:?}"));
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if staging.as_ref().is_none_or(|s| s.len() < values.len()) {
            *staging = Some(self.stream.alloc_zeros::<f32>(values.len()).map_err(|e| fail("allocating the all-reduce buffer", &e))?);
        }
        let buffer = staging.as_mut().expect("allocated above");
        let mut view = buffer.slice_mut(..values.len());
        self.stream.memcpy_htod(values, &mut view).map_err(|e| fail("copying the partial sums", &e))?;
        {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _record) = view.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` covers `values.len()` f32s on this communicator's device and stream.
            unsafe {
                result::all_reduce(ptr as _, ptr as _, values.len(), sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, self.comm, self.stream.cu_stream() as _)
                    .map_err(|e| fail("ncclAllReduce", &e))?;
            }
        }
        self.wait()?;
        self.stream.memcpy_dtoh(&view, values).map_err(|e| fail("copying the sum back", &e))?;
        Ok(())
    }

    fn broadcast(&self, data: &mut Vec<u8>) -> Result<()> {
        self.tcp.broadcast(data)
    }

    fn ready(&self) -> Result<()> {
        self.tcp.ready()
    }

    fn abort(&self, reason: &str) {
        self.tcp.abort(reason);
    }

    fn describe(&self) -> String {
        format!("NCCL on CUDA device {} ({} ranks; bootstrap and batches over TCP)", self.device, self.world())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator is not used after this.
        unsafe { sys::ncclCommAbort(self.comm) };
    }
}
