//! The CPU backend's thread pool: workers started once, which spin between the ops of a step
//! and sleep when idle, and a calling thread that takes part in every job. A job is `tasks`
//! calls of one function, claimed one at a time from a shared counter, so uneven tasks
//! balance themselves.
//!
//! Why not rayon's pool (which the CPU reference still uses): a decode step is ~180 short
//! ops, and handing each to rayon (an injected job, workers woken from sleep) cost ~15% of a
//! 0.58B model's decode step on two cores (`perf`: `__schedule`, `sched_yield`). Here a job
//! is a pointer and a counter; spinning workers see it within a few hundred nanoseconds, and
//! nothing is allocated per job.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before it sleeps: longer than the host's
/// work between two steps, far shorter than a human's pause.
const SPIN: Duration = Duration::from_millis(2);

/// The job being run: a lifetime-erased `&dyn Fn(usize)`, valid while `pending > 0`.
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped (release) once a job is in place; workers run each epoch once.
    epoch: AtomicU64,
    job: Mutex<Option<SendJob>>,
    tasks: AtomicUsize,
    /// Threads taking part in the current job (the workers that started, and the caller).
    threads_in_job: AtomicUsize,
    /// The next unclaimed task, on a cache line of its own (claims bounce it between cores).
    next: Padded,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    /// Per worker: asleep (or about to sleep) and needing an unpark.
    sleeping: Vec<AtomicBool>,
    threads: OnceLock<Vec<Thread>>,
}

#[repr(align(128))]
struct Padded(AtomicUsize);

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync`, and it is only dereferenced while the caller of `run` waits.
unsafe impl Send for SendJob {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time (a second caller waits: two engines may share the pool).
    running: Mutex<()>,
}

thread_local! {
    /// Inside a job: a nested `run` runs its tasks inline (the pool is busy with the outer).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    fn start(threads: usize) -> Pool {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            tasks: AtomicUsize::new(0),
            threads_in_job: AtomicUsize::new(1),
            next: Padded(AtomicUsize::new(0)),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            threads: OnceLock::new(),
        });
        let mut handles = Vec::new();
        for w in 0..workers {
            let worker = shared.clone();
            match std::thread::Builder::new().name(format!("dsrun-cpu-{w}")).spawn(move || work(&worker, w)) {
                Ok(handle) => handles.push(handle.thread().clone()),
                Err(e) => {
                    log::warn!("CPU pool: started {} of {threads} threads ({e}); computing on those", handles.len() + 1);
                    break;
                }
            }
        }
        let workers = handles.len();
        let _ = shared.threads.set(handles);
        Pool { shared, workers, running: Mutex::new(()) }
    }

    /// Threads that compute a job, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Calls `f(0..tasks)`, spread over the pool; returns when every call has returned.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 || self.workers == 0 || IN_JOB.with(Cell::get) {
            (0..tasks).for_each(f);
            return;
        }
        let _one_job = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY (lifetime erasure): workers dereference the job only before they decrement
        // `pending`, and this function returns only once `pending` is 0.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.tasks.store(tasks, Ordering::Relaxed);
        s.threads_in_job.store(self.workers + 1, Ordering::Relaxed);
        s.next.0.store(0, Ordering::Relaxed);
        s.pending.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (asleep, thread) in s.sleeping.iter().zip(s.threads.get().into_iter().flatten()) {
            if asleep.load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        IN_JOB.with(|j| j.set(true));
        let caller = catch_unwind(AssertUnwindSafe(|| claim(s, f)));
        IN_JOB.with(|j| j.set(false));
        while s.pending.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(panic) = caller {
            std::panic::resume_unwind(panic);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a CPU kernel panicked on a pool thread (its message is above)");
        }
    }
}

/// Runs tasks of the current job until none is left, claimed in runs of consecutive tasks
/// (half the remainder's fair share, so a thread streams through neighbouring rows and the
/// claims are few, and uneven tasks still balance at the end).
fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let (tasks, threads) = (s.tasks.load(Ordering::Relaxed), s.threads_in_job.load(Ordering::Relaxed));
    let next = &s.next.0;
    let mut start = next.load(Ordering::Relaxed);
    while start < tasks {
        let run = ((tasks - start) / (2 * threads)).max(1);
        match next.compare_exchange_weak(start, start + run, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                (start..start + run).for_each(f);
                start = next.load(Ordering::Relaxed);
            }
            Err(now) => start = now,
        }
    }
}

/// A worker: waits for each epoch (spinning, then asleep), runs its share, reports done.
fn work(s: &Shared, w: usize) {
    IN_JOB.with(|j| j.set(true));
    crate::hot_path::mark_pool_worker();
    let mut seen = 0u64;
    loop {
        let mut idle_since = None;
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) {
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > SPIN {
                s.sleeping[w].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                s.sleeping[w].store(false, Ordering::SeqCst);
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendJob(job)) = job {
            // SAFETY: the caller of `run` keeps the job alive until `pending` reaches 0.
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| claim(s, f))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();
static REQUESTED: OnceLock<usize> = OnceLock::new();

/// Sets the pool's threads (the caller's included) before it starts; setting the same count
/// again is fine, another one an error.
pub fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::Invalid("--threads 0: give at least 1".into()));
    }
    let requested = *REQUESTED.get_or_init(|| threads);
    let started = POOL.get().map(Pool::threads);
    match started.unwrap_or(requested) {
        count if count == threads => Ok(()),
        count => Err(Error::Invalid(format!("--threads {threads}: the CPU pool is already set to {count} threads in this process"))),
    }
}

/// The pool, started on first use with `set_threads`' count or one thread per physical core.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::start(REQUESTED.get().copied().unwrap_or_else(physical_cores)))
}

/// The host's physical cores (hardware threads of one core share its FMA units and caches:
/// a second thread per core slows these kernels). Linux: the distinct core ids in sysfs;
/// elsewhere, or where sysfs says nothing, the logical CPUs.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = std::collections::HashSet::new();
    for cpu in 0..logical {
        let siblings = std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"));
        match siblings {
            Ok(list) => {
                cores.insert(list.trim().to_string());
            }
            Err(_) => return logical,
        }
    }
    cores.len().clamp(1, logical)
}

/// `f(i, chunk)` for each `chunk`-sized piece of `data` (the last may be shorter), over the pool.
pub fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (len, ptr) = (data.len(), SendPtr(data.as_mut_ptr()));
    pool().run(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let ptr = &ptr;
        // SAFETY: task i alone touches `start..start + chunk` (clipped to the slice), which
        // lies inside `data`, borrowed mutably for this call.
        let piece = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), chunk.min(len - start)) };
        f(i, piece);
    });
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint pieces of one `&mut [T]` (T: Send) to the pool's threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}
