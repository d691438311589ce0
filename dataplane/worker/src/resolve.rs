//! Name resolution for `direct` nodes, off the worker threads: a small pool
//! of resolver threads runs the system resolver; each worker keeps a cache
//! and waits for an answer with a deadline, so a stalled resolver delays
//! only the requests that wait for it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

type Answer = io::Result<Vec<IpAddr>>;

struct Job {
    host: String,
    reply: splicegate_uring::Sender<Answer>,
}

/// The resolver threads' queue.
#[derive(Debug, Clone)]
pub struct Resolver {
    jobs: Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("host", &self.host).finish()
    }
}

impl Resolver {
    /// Start `threads` resolver threads with a bounded queue.
    pub fn start(threads: usize) -> io::Result<Resolver> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(1024);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("splicegate-dns{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        let answer = (job.host.as_str(), 0)
                            .to_socket_addrs()
                            .map(|it| it.map(|a| a.ip()).collect::<Vec<_>>());
                        let _ = job.reply.send(answer);
                    }
                })?;
        }
        Ok(Resolver { jobs: tx })
    }

    async fn lookup(&self, host: &str, deadline: Instant) -> Answer {
        let (tx, mut rx) = splicegate_uring::channel();
        match self.jobs.try_send(Job {
            host: host.to_string(),
            reply: tx,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(io::Error::other("the resolver queue is full"));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(io::Error::other("the resolver stopped"));
            }
        }
        match splicegate_uring::timeout_at(deadline, rx.recv()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(io::Error::other("the resolver dropped the query")),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "name resolution timed out",
            )),
        }
    }
}

/// A worker's cache of answers (positive only), bounded.
#[derive(Debug, Default)]
pub(crate) struct DnsCache {
    entries: RefCell<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

const TTL: Duration = Duration::from_secs(30);
const MAX_ENTRIES: usize = 10_000;

impl DnsCache {
    pub(crate) async fn resolve(
        &self,
        resolver: &Resolver,
        host: &str,
        timeout: Duration,
    ) -> Answer {
        let now = Instant::now();
        if let Some((ips, expires)) = self.entries.borrow().get(host)
            && *expires > now
        {
            return Ok(ips.clone());
        }
        let ips = resolver.lookup(host, now + timeout).await?;
        if ips.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the name has no address",
            ));
        }
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, e)| *e > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(host.to_string(), (ips.clone(), now + TTL));
        Ok(ips)
    }
}
