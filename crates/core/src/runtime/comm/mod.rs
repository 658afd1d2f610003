//! Communicators: how the ranks of a distributed engine (one device each) exchange a step's
//! batch and their MoE layers' partial sums. One interface, three transports:
//!
//! - [`InProcess`]: ranks are threads of one process (several wgpu adapters or devices, several
//!   emulated CUDA devices): reductions through host memory. The tests' communicator too.
//! - [`Tcp`]: ranks are processes, started as PyTorch users start them (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`: [`Launch`]); rank 0 listens at the master
//!   address and the others connect to it; reductions go through rank 0 in rank order.
//! - `Nccl` (the `cuda` feature): NCCL's all-reduce between CUDA devices, within a node and
//!   across nodes, bootstrapped over `Tcp` (its unique id is broadcast through the master
//!   address), which also carries each step's batch.
//!
//! Every collective sums in rank order (rank 0's values, plus rank 1's, ...), so every rank holds
//! the same bits and the result does not depend on the transport. A rank that fails or goes
//! away ends every collective the others are in with [`Error::Rank`] naming it; a rank that
//! stops answering inside a step does after the communicator's timeout.

mod in_process;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp;

pub use in_process::InProcess;
#[cfg(feature = "cuda")]
pub use nccl::{load_library as load_nccl, Nccl};
pub use tcp::Tcp;

use crate::error::{Error, Result};
use std::time::Duration;

/// How long a rank waits inside a step for the others (a collective of a MoE layer) before it
/// gives up, naming who did not come: `DSRUN_COMM_TIMEOUT` seconds, default 300. Waiting for
/// the next step's batch has no limit (an idle server), only a departed rank ends it.
pub fn step_timeout() -> Duration {
    let seconds = std::env::var("DSRUN_COMM_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0).unwrap_or(300.0);
    Duration::from_secs_f64(seconds)
}

/// The collectives a distributed engine needs. Every rank calls the same ones in the same order.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `values` over the ranks, in rank order; every rank gets the sum.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
    /// Rank 0's `data` to every rank (replacing theirs); the others wait without a time limit.
    fn broadcast(&self, data: &mut Vec<u8>) -> Result<()>;
    /// Waits until every rank is ready (has loaded its share: minutes for a big model, so
    /// without a time limit); ends with an error where a rank failed or left instead.
    fn ready(&self) -> Result<()>;
    /// Tells the others this rank is gone and why, so none waits for it.
    fn abort(&self, reason: &str);
    /// The transport, for stats lines.
    fn describe(&self) -> String;
}

/// Sums `parts` (one per rank, rank order) into `out`: the one summation order of every
/// transport.
pub(crate) fn sum_in_rank_order<'a>(out: &mut [f32], mut parts: impl Iterator<Item = &'a [f32]>) {
    if let Some(first) = parts.next() {
        out.copy_from_slice(first);
    }
    parts.for_each(|part| add_into(out, part));
}

/// `out += part`, value by value: the next rank's term of the sum.
pub(crate) fn add_into(out: &mut [f32], part: &[f32]) {
    for (o, v) in out.iter_mut().zip(part) {
        *o += v;
    }
}

/// Where this process sits in a multi-process job, from the environment `torchrun` sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Which of this node's devices the rank uses.
    pub local_rank: usize,
    /// Where rank 0 listens (`MASTER_ADDR:MASTER_PORT`).
    pub master: String,
}

impl Launch {
    /// The job from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`: None when
    /// `WORLD_SIZE` is unset or 1 (one process), an error naming the variable when one is
    /// missing or malformed. `WORLD_SIZE=1` with `DSRUN_COMM` set is a job of one rank through
    /// that communicator (the whole distributed path on one device: NCCL's cost measured).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| Error::Invalid(format!("{k}={v:?}: expected a whole number (set by torchrun or by hand)"))),
            }
        };
        let world = match number("WORLD_SIZE")? {
            Some(1) if var("DSRUN_COMM").is_some() => {
                let (addr, port) = (var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()), number("MASTER_PORT")?.unwrap_or(0));
                return Ok(Some(Launch { rank: 0, world: 1, local_rank: number("LOCAL_RANK")?.unwrap_or(0), master: format!("{addr}:{port}") }));
            }
            None | Some(1) => return Ok(None),
            Some(0) => return Err(Error::Invalid("WORLD_SIZE=0: a job has at least one rank".into())),
            Some(w) => w,
        };
        let missing = |k: &str| Error::Invalid(format!("WORLD_SIZE={world} but {k} is not set: set RANK, MASTER_ADDR and MASTER_PORT on every rank (torchrun does)"));
        let rank = number("RANK")?.ok_or_else(|| missing("RANK"))?;
        if rank >= world {
            return Err(Error::Invalid(format!("RANK={rank} with WORLD_SIZE={world}: ranks are 0 to {}", world - 1)));
        }
        let local_rank = number("LOCAL_RANK")?.unwrap_or(0);
        let addr = var("MASTER_ADDR").ok_or_else(|| missing("MASTER_ADDR"))?;
        let port = number("MASTER_PORT")?.ok_or_else(|| missing("MASTER_PORT"))?;
        if port == 0 || port > 65535 {
            return Err(Error::Invalid(format!("MASTER_PORT={port}: expected a TCP port, 1 to 65535")));
        }
        Ok(Some(Launch { rank, world, local_rank, master: format!("{addr}:{port}") }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn launch_from_torchrun_variables() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(Launch::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap(), None);
        let one = Launch::from_vars(vars(&[("WORLD_SIZE", "1"), ("DSRUN_COMM", "nccl")])).unwrap().unwrap();
        assert_eq!(one, Launch { rank: 0, world: 1, local_rank: 0, master: "127.0.0.1:0".into() });
        let l = Launch::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")])).unwrap().unwrap();
        assert_eq!(l, Launch { rank: 3, world: 4, local_rank: 1, master: "10.0.0.1:29500".into() });
        for (bad, says) in [
            (vec![("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")], "RANK is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")], "ranks are 0 to 1"),
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE=\"two\""),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")], "MASTER_ADDR is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "70000")], "MASTER_PORT=70000"),
        ] {
            let e = Launch::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn rank_order_sum() {
        let parts = [vec![1.0f32, 1e8], vec![2.0, 1.0], vec![3.0, -1e8]];
        let mut out = vec![0.0; 2];
        sum_in_rank_order(&mut out, parts.iter().map(|p| &p[..]));
        assert_eq!(out, [6.0, (1e8f32 + 1.0) - 1e8]);
    }
}
