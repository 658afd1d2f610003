//! Ranks as processes, joined over TCP through rank 0 (a star): rank 0 listens at the master
//! address, every other rank connects and introduces itself (its rank and the world size it was
//! started with), and each collective goes through rank 0, which sums in rank order. This is the
//! bootstrap of every multi-process job (NCCL's unique id travels over it) and the host-mediated
//! transport where there is no NCCL. A failing rank sends its reason before it goes; a killed
//! one closes its sockets: either way every other rank's collective ends with an error naming it.

use super::{add_into, step_timeout, Communicator, Launch};
use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"DSRN";
const VERSION: u32 = 1;
/// Frame tags: data, or a rank's failure (its rank and reason).
const DATA: u8 = 0;
const ABORT: u8 = 1;

pub struct Tcp {
    rank: usize,
    world: usize,
    timeout: Duration,
    link: Mutex<Link>,
}

enum Link {
    /// Rank 0: a stream to each other rank, in rank order.
    Root {
        peers: Vec<TcpStream>,
        sum: Vec<f32>,
        part: Vec<f32>,
    },
    Leaf {
        root: TcpStream,
    },
}

impl Tcp {
    /// Joins the job `launch` describes: rank 0 waits for the others (up to the step timeout),
    /// the others connect (retrying until rank 0 listens, up to the same timeout).
    pub fn connect(launch: &Launch) -> Result<Tcp> {
        Self::connect_with_timeout(launch, step_timeout())
    }

    pub fn connect_with_timeout(launch: &Launch, timeout: Duration) -> Result<Tcp> {
        let Launch { rank, world, ref master, .. } = *launch;
        let fail = |reason: String| Error::Rank { rank, world, reason };
        let link = if rank == 0 {
            let listener = TcpListener::bind(master).map_err(|e| fail(format!("cannot listen at MASTER_ADDR:MASTER_PORT {master}: {e}")))?;
            listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
            let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            let started = Instant::now();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, from)) => {
                        stream.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                        prepare(&stream, Some(timeout)).map_err(|e| fail(e.to_string()))?;
                        let (peer, peer_world) = read_hello(&mut stream).map_err(|e| fail(format!("a connection from {from} is not a dsrun rank: {e}")))?;
                        if peer_world != world || peer == 0 || peer >= world || peers[peer - 1].is_some() {
                            let why = format!("{from} joined as rank {peer} of {peer_world}, but this job has ranks 1 to {} of {world} left", world - 1);
                            let _ = write_frame(&mut stream, ABORT, why.as_bytes());
                            return Err(fail(why));
                        }
                        write_hello(&mut stream, peer, world).map_err(|e| fail(e.to_string()))?;
                        peers[peer - 1] = Some(stream);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if started.elapsed() > timeout {
                            let missing: Vec<String> = peers.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                            return Err(fail(format!("ranks {} did not connect to {master} within {:.0} s", missing.join(", "), timeout.as_secs_f64())));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(fail(format!("accepting ranks at {master}: {e}"))),
                }
            }
            Link::Root { peers: peers.into_iter().flatten().collect(), sum: Vec::new(), part: Vec::new() }
        } else {
            let started = Instant::now();
            let mut stream = loop {
                let addrs: Vec<_> = master.to_socket_addrs().map_err(|e| fail(format!("MASTER_ADDR:MASTER_PORT {master}: {e}")))?.collect();
                match addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok()) {
                    Some(s) => break s,
                    None if started.elapsed() > timeout => return Err(fail(format!("rank 0 was not listening at {master} within {:.0} s", timeout.as_secs_f64()))),
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            prepare(&stream, Some(timeout)).map_err(|e| fail(e.to_string()))?;
            write_hello(&mut stream, rank, world).map_err(|e| fail(e.to_string()))?;
            match read_hello(&mut stream) {
                Ok((r, w)) if r == rank && w == world => {}
                Ok((r, w)) => return Err(fail(format!("rank 0 answered as if to rank {r} of {w}"))),
                Err(e) => return Err(fail(format!("rank 0 at {master} refused this rank: {e}"))),
            }
            Link::Leaf { root: stream }
        };
        Ok(Tcp { rank, world, timeout, link: Mutex::new(link) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error for a failed read from `peer`: its own abort, its departure, or its silence.
    fn peer_error(&self, peer: usize, e: FrameError) -> Error {
        let (rank, reason) = match e {
            FrameError::Aborted { rank, reason } => (rank, reason),
            FrameError::Io(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                (peer, format!("sent nothing for {:.0} s inside a step (DSRUN_COMM_TIMEOUT)", self.timeout.as_secs_f64()))
            }
            FrameError::Io(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe) => {
                (peer, format!("closed its connection: the process ended or was killed ({e})"))
            }
            FrameError::Io(e) => (peer, format!("connection lost: {e}")),
            FrameError::Malformed(why) => (peer, format!("sent a malformed message: {why}")),
        };
        Error::Rank { rank, world: self.world, reason }
    }

    /// Rank 0 passes a failure on to every other rank (best effort: some may be gone).
    fn tell_all(peers: &mut [TcpStream], rank: usize, reason: &str) {
        let mut payload = (rank as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        for p in peers {
            let _ = write_frame(p, ABORT, &payload);
        }
    }
}

impl Communicator for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let mut link = self.lock();
        match &mut *link {
            Link::Root { peers, sum, part } => {
                sum.clear();
                sum.extend_from_slice(values);
                for i in 0..peers.len() {
                    let read = peers[i].set_read_timeout(Some(self.timeout)).map_err(FrameError::Io).and_then(|_| read_floats(&mut peers[i], part, values.len()));
                    if let Err(e) = read {
                        let error = self.peer_error(i + 1, e);
                        if let Error::Rank { rank, reason, .. } = &error {
                            Self::tell_all(peers, *rank, reason);
                        }
                        return Err(error);
                    }
                    add_into(sum, part);
                }
                for (i, p) in peers.iter_mut().enumerate() {
                    write_frame(p, DATA, bytemuck::cast_slice(sum)).map_err(|e| self.peer_error(i + 1, FrameError::Io(e)))?;
                }
                values.copy_from_slice(sum);
                Ok(())
            }
            Link::Leaf { root } => {
                write_frame(root, DATA, bytemuck::cast_slice(values)).map_err(|e| self.peer_error(0, FrameError::Io(e)))?;
                let mut sum = Vec::with_capacity(values.len());
                root.set_read_timeout(Some(self.timeout)).map_err(|e| self.peer_error(0, FrameError::Io(e)))?;
                read_floats(root, &mut sum, values.len()).map_err(|e| self.peer_error(0, e))?;
                values.copy_from_slice(&sum);
                Ok(())
            }
        }
    }

    fn broadcast(&self, data: &mut Vec<u8>) -> Result<()> {
        let mut link = self.lock();
        match &mut *link {
            Link::Root { peers, .. } => {
                for (i, p) in peers.iter_mut().enumerate() {
                    write_frame(p, DATA, data).map_err(|e| self.peer_error(i + 1, FrameError::Io(e)))?;
                }
                Ok(())
            }
            Link::Leaf { root } => {
                root.set_read_timeout(None).map_err(|e| self.peer_error(0, FrameError::Io(e)))?;
                *data = read_frame(root).map_err(|e| self.peer_error(0, e))?;
                Ok(())
            }
        }
    }

    fn ready(&self) -> Result<()> {
        let mut link = self.lock();
        match &mut *link {
            Link::Root { peers, .. } => {
                for i in 0..peers.len() {
                    let read = peers[i].set_read_timeout(None).map_err(FrameError::Io).and_then(|_| read_frame(&mut peers[i]));
                    if let Err(e) = read {
                        let error = self.peer_error(i + 1, e);
                        if let Error::Rank { rank, reason, .. } = &error {
                            Self::tell_all(peers, *rank, reason);
                        }
                        return Err(error);
                    }
                }
                for (i, p) in peers.iter_mut().enumerate() {
                    write_frame(p, DATA, &[]).map_err(|e| self.peer_error(i + 1, FrameError::Io(e)))?;
                }
                Ok(())
            }
            Link::Leaf { root } => {
                write_frame(root, DATA, &[]).map_err(|e| self.peer_error(0, FrameError::Io(e)))?;
                root.set_read_timeout(None).map_err(|e| self.peer_error(0, FrameError::Io(e)))?;
                read_frame(root).map(|_| ()).map_err(|e| self.peer_error(0, e))
            }
        }
    }

    fn abort(&self, reason: &str) {
        let mut link = self.lock();
        match &mut *link {
            Link::Root { peers, .. } => Self::tell_all(peers, self.rank, reason),
            Link::Leaf { root } => {
                let mut payload = (self.rank as u32).to_le_bytes().to_vec();
                payload.extend_from_slice(reason.as_bytes());
                let _ = write_frame(root, ABORT, &payload);
            }
        }
    }

    fn describe(&self) -> String {
        format!("TCP through rank 0 ({} ranks, host-mediated)", self.world)
    }
}

fn prepare(stream: &TcpStream, timeout: Option<Duration>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)
}

fn write_hello(stream: &mut TcpStream, rank: usize, world: usize) -> std::io::Result<()> {
    let mut hello = MAGIC.to_vec();
    for v in [VERSION, rank as u32, world as u32] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    write_frame(stream, DATA, &hello)
}

fn read_hello(stream: &mut TcpStream) -> Result<(usize, usize), FrameError> {
    let hello = read_frame(stream)?;
    if hello.len() != 16 || &hello[..4] != MAGIC {
        return Err(FrameError::Malformed("not a dsrun hello".into()));
    }
    let word = |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
    if word(4) != VERSION {
        return Err(FrameError::Malformed(format!("protocol version {} (this dsrun speaks {VERSION}: run the same dsrun on every rank)", word(4))));
    }
    Ok((word(8) as usize, word(12) as usize))
}

#[derive(Debug)]
enum FrameError {
    Io(std::io::Error),
    Aborted { rank: usize, reason: String },
    Malformed(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::Aborted { rank, reason } => write!(f, "rank {rank}: {reason}"),
            FrameError::Malformed(why) => write!(f, "{why}"),
        }
    }
}

/// A frame: tag, little-endian u64 length, payload.
fn write_frame(stream: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = tag;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)
}

/// Frames carry at most this much (a step's batch, a layer's routed sums): a corrupt length
/// is refused before it is allocated.
const MAX_FRAME: u64 = 1 << 32;

fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).map_err(FrameError::Io)?;
    let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        return Err(FrameError::Malformed(format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).map_err(FrameError::Io)?;
    match header[0] {
        DATA => Ok(payload),
        ABORT if payload.len() >= 4 => {
            let rank = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
            Err(FrameError::Aborted { rank, reason: String::from_utf8_lossy(&payload[4..]).into_owned() })
        }
        tag => Err(FrameError::Malformed(format!("frame tag {tag}"))),
    }
}

fn read_floats(stream: &mut TcpStream, out: &mut Vec<f32>, count: usize) -> Result<(), FrameError> {
    let bytes = read_frame(stream)?;
    if bytes.len() != count * 4 {
        return Err(FrameError::Malformed(format!("{} values where {count} were reduced (ranks out of step)", bytes.len() / 4)));
    }
    out.clear();
    out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch { rank, world, local_rank: rank, master: format!("127.0.0.1:{port}") }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn three_ranks_reduce_and_broadcast_over_loopback() {
        let port = free_port();
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let c = Tcp::connect_with_timeout(&launch(r, 3, port), Duration::from_secs(20)).unwrap();
                        c.ready().unwrap();
                        let mut v = vec![r as f32, 0.5];
                        for round in 0..20 {
                            let mut b = if r == 0 { vec![round as u8; 3] } else { Vec::new() };
                            c.broadcast(&mut b).unwrap();
                            assert_eq!(b, vec![round as u8; 3]);
                            v = vec![r as f32 + round as f32, 0.5];
                            c.all_reduce_sum(&mut v).unwrap();
                        }
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(sums.iter().all(|s| *s == [3.0 + 3.0 * 19.0, 1.5]));
    }

    #[test]
    fn a_failing_rank_is_named_on_every_other() {
        let port = free_port();
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let c = Tcp::connect_with_timeout(&launch(r, 3, port), Duration::from_secs(20)).unwrap();
                        if r == 2 {
                            c.abort("the device was lost");
                            return String::new();
                        }
                        // Loading takes as long as it takes: a rank that fails loading is named.
                        c.ready().unwrap_err().to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors[..2].iter().all(|e| e.contains("rank 2 of 3: the device was lost")), "{errors:?}");
    }

    #[test]
    fn a_closed_rank_and_a_silent_one() {
        let port = free_port();
        std::thread::scope(|s| {
            let leaf = s.spawn(move || drop(Tcp::connect_with_timeout(&launch(1, 2, port), Duration::from_secs(20)).unwrap()));
            let root = Tcp::connect_with_timeout(&launch(0, 2, port), Duration::from_secs(20)).unwrap();
            leaf.join().unwrap();
            let e = root.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
            assert!(e.contains("rank 1 of 2: closed its connection"), "{e}");
        });
        let port = free_port();
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let leaf = s.spawn(move || {
                let c = Tcp::connect_with_timeout(&launch(1, 2, port), Duration::from_secs(20)).unwrap();
                rx.recv().unwrap();
                drop(c);
            });
            let root = Tcp::connect_with_timeout(&launch(0, 2, port), Duration::from_millis(300)).unwrap();
            let started = Instant::now();
            let e = root.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
            assert!(e.contains("rank 1 of 2: sent nothing for"), "{e}");
            assert!(started.elapsed() < Duration::from_secs(10));
            tx.send(()).unwrap();
            leaf.join().unwrap();
        });
    }

    #[test]
    fn a_stranger_or_a_wrong_world_is_refused() {
        let port = free_port();
        std::thread::scope(|s| {
            let root = s.spawn(move || Tcp::connect_with_timeout(&launch(0, 2, port), Duration::from_secs(20)).err().map(|e| e.to_string()));
            let e = Tcp::connect_with_timeout(&launch(1, 3, port), Duration::from_secs(20)).err().map(|e| e.to_string());
            let root = root.join().unwrap().unwrap();
            assert!(root.contains("joined as rank 1 of 3"), "{root}");
            assert!(e.unwrap().contains("refused"));
        });
    }
}
