//! Ranks as threads of one process: each collective is a meeting in shared memory. The last rank
//! to arrive computes the result (the sum in rank order, or rank 0's bytes) and wakes the others.
//! Results are kept in two alternating slots: a fast rank may start the next collective (the
//! other slot) while slower ones still copy this one's, and cannot get further than that.

use super::{step_timeout, sum_in_rank_order, Communicator};
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One rank's handle; [`InProcess::group`] makes all of them.
pub struct InProcess {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    timeout: Duration,
}

struct State {
    /// Collectives completed.
    generation: u64,
    arrived: usize,
    /// The collective each rank last arrived at (who is missing, on a timeout).
    at: Vec<u64>,
    /// By the generation's parity: each rank's values, their sum, rank 0's bytes.
    parts: [Vec<Vec<f32>>; 2],
    sums: [Vec<f32>; 2],
    bytes: [Vec<u8>; 2],
    /// The first rank that failed or left, and why.
    gone: Option<(usize, String)>,
}

impl InProcess {
    /// Handles for `world` ranks, rank order, with the step timeout from the environment.
    pub fn group(world: usize) -> Vec<InProcess> {
        Self::group_with_timeout(world, step_timeout())
    }

    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<InProcess> {
        let state = State {
            generation: 0,
            arrived: 0,
            at: vec![u64::MAX; world],
            parts: [vec![Vec::new(); world], vec![Vec::new(); world]],
            sums: [Vec::new(), Vec::new()],
            bytes: [Vec::new(), Vec::new()],
            gone: None,
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), wake: Condvar::new(), timeout });
        (0..world).map(|rank| InProcess { rank, world, shared: shared.clone() }).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked holding the lock left the state whole (every update is a few
        // assignments); carry on so the others see it gone instead of a second panic.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gone_error(&self, (rank, reason): &(usize, String)) -> Error {
        Error::Rank { rank: *rank, world: self.world, reason: reason.clone() }
    }

    /// Arrives at the next collective: `deposit` leaves this rank's part, the last to arrive runs
    /// `finish`; returns the locked state and the result slot once every rank has arrived.
    /// `limit`: how long to wait (None: until every rank arrives or one leaves).
    fn meet(&self, deposit: impl FnOnce(&mut State, usize), finish: impl FnOnce(&mut State, usize), limit: Option<Duration>) -> Result<(MutexGuard<'_, State>, usize)> {
        let mut state = self.lock();
        if let Some(gone) = &state.gone {
            return Err(self.gone_error(gone));
        }
        let generation = state.generation;
        let slot = (generation % 2) as usize;
        deposit(&mut state, slot);
        state.at[self.rank] = generation;
        state.arrived += 1;
        if state.arrived == self.world {
            finish(&mut state, slot);
            state.arrived = 0;
            state.generation += 1;
            self.shared.wake.notify_all();
            return Ok((state, slot));
        }
        let started = Instant::now();
        loop {
            if state.generation != generation {
                return Ok((state, slot));
            }
            if let Some(gone) = &state.gone {
                return Err(self.gone_error(gone));
            }
            let wait = match limit {
                Some(limit) => match limit.checked_sub(started.elapsed()) {
                    Some(left) => left,
                    None => {
                        let missing = (0..self.world).find(|&r| state.at[r] != generation).unwrap_or(0);
                        let reason = format!("did not reach a collective within {:.0} s (DSRUN_COMM_TIMEOUT)", limit.as_secs_f64());
                        state.gone = Some((missing, reason));
                        self.shared.wake.notify_all();
                        continue;
                    }
                },
                None => Duration::from_secs(3600),
            };
            state = self.shared.wake.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let rank = self.rank;
        let deposit = |s: &mut State, slot: usize| {
            let part = &mut s.parts[slot][rank];
            part.clear();
            part.extend_from_slice(values);
        };
        let finish = |s: &mut State, slot: usize| {
            let State { parts, sums, .. } = s;
            let sum = &mut sums[slot];
            sum.resize(parts[slot][0].len(), 0.0);
            if parts[slot].iter().any(|p| p.len() != sum.len()) {
                s.gone = Some((rank, "ranks reduced different lengths (ranks out of step)".into()));
                return;
            }
            sum_in_rank_order(sum, parts[slot].iter().map(|p| &p[..]));
        };
        let (state, slot) = self.meet(deposit, finish, Some(self.shared.timeout))?;
        if let Some(gone) = &state.gone {
            return Err(self.gone_error(gone));
        }
        values.copy_from_slice(&state.sums[slot]);
        Ok(())
    }

    fn broadcast(&self, data: &mut Vec<u8>) -> Result<()> {
        let root = self.rank == 0;
        let deposit = |s: &mut State, slot: usize| {
            if root {
                s.bytes[slot].clear();
                s.bytes[slot].extend_from_slice(data);
            }
        };
        let (state, slot) = self.meet(deposit, |_, _| {}, root.then_some(self.shared.timeout))?;
        if !root {
            data.clear();
            data.extend_from_slice(&state.bytes[slot]);
        }
        Ok(())
    }

    fn ready(&self) -> Result<()> {
        self.meet(|_, _| {}, |_, _| {}, None).map(|_| ())
    }

    fn abort(&self, reason: &str) {
        let mut state = self.lock();
        if state.gone.is_none() {
            state.gone = Some((self.rank, reason.to_string()));
        }
        self.shared.wake.notify_all();
    }

    fn describe(&self) -> String {
        format!("in-process ({} ranks, host memory)", self.world)
    }
}

impl Drop for InProcess {
    /// A rank that goes away (its thread ended, cleanly or not) ends the others' waits.
    fn drop(&mut self) {
        self.abort("left the job");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_and_broadcast_across_threads() {
        let ranks = InProcess::group_with_timeout(3, Duration::from_secs(10));
        let results: Vec<(Vec<f32>, Vec<u8>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut last = (Vec::new(), Vec::new());
                        // Many rounds: a fast rank runs ahead into the other slot.
                        for round in 0..200u32 {
                            let mut v = vec![c.rank() as f32 + round as f32, 1.0];
                            c.all_reduce_sum(&mut v).unwrap();
                            let mut b = if c.rank() == 0 { round.to_le_bytes().to_vec() } else { vec![9; 7] };
                            c.broadcast(&mut b).unwrap();
                            assert_eq!(b, round.to_le_bytes());
                            assert_eq!(v, [3.0 + 3.0 * round as f32, 3.0]);
                            last = (v, b);
                        }
                        last
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn a_rank_that_leaves_ends_the_others_waits() {
        let mut ranks = InProcess::group_with_timeout(3, Duration::from_secs(30));
        let last = ranks.pop().unwrap();
        let started = Instant::now();
        let errors: Vec<String> = std::thread::scope(|s| {
            let waiting: Vec<_> = ranks.iter().map(|c| s.spawn(move || c.all_reduce_sum(&mut [1.0]).unwrap_err().to_string())).collect();
            std::thread::sleep(Duration::from_millis(50));
            drop(last);
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        for e in errors {
            assert!(e.contains("rank 2 of 3: left the job"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_named_after_the_timeout() {
        let ranks = InProcess::group_with_timeout(2, Duration::from_millis(200));
        let e = ranks[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(e.contains("rank 1 of 2") && e.contains("within"), "{e}");
        // Every later collective fails at once.
        assert!(ranks[1].broadcast(&mut Vec::new()).is_err());
    }
}
