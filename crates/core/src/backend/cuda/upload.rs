//! Host-to-device copies for streamed experts on the driver: through a pinned staging buffer
//! in two halves, on a copy stream of their own. Events order them after the compute that last
//! read the slots and before the compute that reads them next; a copy out of one half overlaps
//! filling the other, and copies run at pinned-memory speed (pageable copies are staged by
//! the driver at a fraction of it).

use crate::error::{Error, Result};
use cudarc::driver::{result, sys};

/// Bytes of each staging half.
const HALF: usize = 32 << 20;

pub struct Uploader {
    copy: sys::CUstream,
    staging: *mut u8,
    /// Per half: recorded after its last copy (the half is free once it completes).
    copied: [sys::CUevent; 2],
    next: usize,
    compute_done: sys::CUevent,
    uploads_done: sys::CUevent,
}

fn error(what: &'static str) -> impl Fn(result::DriverError) -> Error {
    move |e| Error::device("CUDA expert uploads", what, format!("{e:?}"))
}

// SAFETY: streams, events and the pinned staging buffer are driver handles owned by this
// uploader alone; the driver allows them to be used from any thread that binds the context.
unsafe impl Send for Uploader {}

// Streams and events are opaque driver handles passed back to the driver, never dereferenced.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
impl Uploader {
    /// Needs the device's context current on this thread.
    pub fn new() -> Result<Uploader> {
        let event = || result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(error("creating an event"));
        // SAFETY: a fresh pinned allocation of 2 * HALF bytes, freed in Drop.
        let staging = unsafe { result::malloc_host(2 * HALF, 0) }.map_err(error("allocating pinned host memory"))? as *mut u8;
        Ok(Uploader {
            copy: result::stream::create(result::stream::StreamKind::NonBlocking).map_err(error("creating the copy stream"))?,
            staging,
            copied: [event()?, event()?],
            next: 0,
            compute_done: event()?,
            uploads_done: event()?,
        })
    }

    /// Copies queued from now on wait for the work queued so far on `compute`.
    pub fn after(&mut self, compute: sys::CUstream) -> Result<()> {
        // SAFETY: events and streams are live handles of this context.
        unsafe {
            result::event::record(self.compute_done, compute).map_err(error("recording an event"))?;
            result::stream::wait_event(self.copy, self.compute_done, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).map_err(error("ordering copies"))
        }
    }

    /// Queues the copy of `data` to device address `dst`, through the staging halves.
    pub fn copy(&mut self, dst: u64, data: &[u8]) -> Result<()> {
        for (i, piece) in data.chunks(HALF).enumerate() {
            let h = self.next;
            self.next ^= 1;
            // SAFETY: the half is reused only after its previous copy completed (event); the
            // device range was checked by the caller; the staging buffer holds 2 * HALF bytes.
            unsafe {
                result::event::synchronize(self.copied[h]).map_err(error("waiting for a staging buffer"))?;
                let stage = std::slice::from_raw_parts_mut(self.staging.add(h * HALF), piece.len());
                stage.copy_from_slice(piece);
                result::memcpy_htod_async(dst + (i * HALF) as u64, stage, self.copy).map_err(error("copying to the device"))?;
                result::event::record(self.copied[h], self.copy).map_err(error("recording an event"))?;
            }
        }
        Ok(())
    }

    /// Work queued on `compute` from now on waits for the copies queued so far.
    pub fn before(&mut self, compute: sys::CUstream) -> Result<()> {
        // SAFETY: as in `after`.
        unsafe {
            result::event::record(self.uploads_done, self.copy).map_err(error("recording an event"))?;
            result::stream::wait_event(compute, self.uploads_done, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).map_err(error("ordering kernels after copies"))
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // SAFETY: handles created in `new`, destroyed once after the copies finished.
        unsafe {
            let _ = result::stream::synchronize(self.copy);
            for e in [self.copied[0], self.copied[1], self.compute_done, self.uploads_done] {
                let _ = result::event::destroy(e);
            }
            let _ = result::stream::destroy(self.copy);
            let _ = result::free_host(self.staging as *mut std::ffi::c_void);
        }
    }
}
