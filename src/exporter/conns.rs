//! The open connections of the exporter and which one to close when there
//! are too many (or when file descriptors run short). The client holding
//! the most connections loses one, so one client's flood cannot close
//! another's scrapes; among its connections, in this order:
//!
//! 1. one that has sent no request for [`GRACE`] since it opened (silent),
//!    oldest first;
//! 2. one idle between requests (keep-alive), least recently active first;
//! 3. one younger than [`GRACE`] that has sent no request yet, oldest first.
//!
//! A request in progress is never closed: when only those remain, the new
//! connection is refused instead.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time a new connection has to send its first request before it counts
/// as silent.
pub const GRACE: Duration = Duration::from_secs(1);

/// What a connection task reports about itself.
#[derive(Debug)]
pub struct Activity {
    /// Requests started on it.
    requests: AtomicU64,
    /// Requests being answered.
    busy: AtomicU64,
    /// When the last one started, in microseconds since the table's epoch.
    last_request_us: AtomicU64,
    epoch: Instant,
}

/// A request being answered; the connection is idle again once dropped.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// A request starts on this connection: how many did so far, and a
    /// guard to drop once it is answered.
    pub fn request(self: &Arc<Self>) -> (u64, Busy) {
        let us = self.epoch.elapsed().as_micros() as u64;
        self.last_request_us.store(us, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        (n, Busy(Arc::clone(self)))
    }
}

/// Something that closes a connection (its task aborted).
pub trait Close: Send {
    /// Closes it now.
    fn close(&self);
}

impl Close for tokio::task::AbortHandle {
    fn close(&self) {
        self.abort();
    }
}

struct Entry {
    peer: IpAddr,
    opened_us: u64,
    activity: Arc<Activity>,
    close: Box<dyn Close>,
}

/// The table of open connections, in the order they were accepted.
pub struct Conns {
    inner: Mutex<BTreeMap<u64, Entry>>,
    next: AtomicU64,
    epoch: Instant,
}

impl Conns {
    /// An empty table.
    pub fn new() -> Self {
        Conns {
            inner: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A number for the next connection and its activity record, before it
    /// is [`Conns::admit`]ted.
    pub fn reserve(&self) -> (u64, Arc<Activity>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            requests: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            last_request_us: AtomicU64::new(0),
            epoch: self.epoch,
        });
        (id, activity)
    }

    /// Records the open connection `id` from `peer`.
    pub fn admit(&self, id: u64, peer: IpAddr, activity: Arc<Activity>, close: Box<dyn Close>) {
        let opened_us = self.epoch.elapsed().as_micros() as u64;
        self.lock().insert(
            id,
            Entry {
                peer,
                opened_us,
                activity,
                close,
            },
        );
    }

    /// Forgets connection `id` (it ended).
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes the connection that matters least (see the module docs) to
    /// make room for one from `newcomer` (counted with its client); false
    /// if every candidate is answering a request.
    pub fn evict_one(&self, newcomer: Option<IpAddr>) -> bool {
        let mut map = self.lock();
        let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
        for e in map.values() {
            *per_peer.entry(e.peer).or_default() += 1;
        }
        if let Some(p) = newcomer {
            *per_peer.entry(p).or_default() += 1;
        }
        let now_us = self.epoch.elapsed().as_micros() as u64;
        let grace_us = GRACE.as_micros() as u64;
        let victim = map
            .iter()
            .filter(|(_, e)| e.activity.busy.load(Ordering::Relaxed) == 0)
            .min_by_key(|(_, e)| {
                let silent = e.activity.requests.load(Ordering::Relaxed) == 0;
                let (class, when) = match silent {
                    true if now_us.saturating_sub(e.opened_us) >= grace_us => (0, e.opened_us),
                    false => (1, e.activity.last_request_us.load(Ordering::Relaxed)),
                    true => (2, e.opened_us),
                };
                (std::cmp::Reverse(per_peer[&e.peer]), class, when)
            })
            .map(|(id, _)| *id);
        match victim.and_then(|id| map.remove(&id)) {
            Some(e) => {
                e.close.close();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Flag(Arc<AtomicBool>);
    impl Close for Flag {
        fn close(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    fn open(conns: &Conns, peer: IpAddr) -> (Arc<Activity>, Arc<AtomicBool>) {
        let (id, a) = conns.reserve();
        let closed = Arc::new(AtomicBool::new(false));
        conns.admit(
            id,
            peer,
            Arc::clone(&a),
            Box::new(Flag(Arc::clone(&closed))),
        );
        (a, closed)
    }

    fn closed(flag: &AtomicBool) -> bool {
        flag.load(Ordering::Relaxed)
    }

    #[test]
    fn silent_clients_go_first_then_the_least_recently_active() {
        let conns = Conns::new();
        let (scrape, scrape_closed) = open(&conns, A);
        let (_, silent1) = open(&conns, A);
        let (stuck, stuck_closed) = open(&conns, A);
        let (_, silent2) = open(&conns, A);
        drop(stuck.request());
        std::thread::sleep(GRACE + Duration::from_millis(5));
        let (_, young) = open(&conns, A);
        let busy = scrape.request();
        assert!(conns.evict_one(None) && closed(&silent1));
        assert!(conns.evict_one(None) && closed(&silent2));
        assert!(conns.evict_one(None) && closed(&stuck_closed));
        assert!(conns.evict_one(None) && closed(&young));
        assert!(!closed(&scrape_closed));
        assert_eq!(conns.len(), 1);
        assert!(
            !conns.evict_one(None),
            "a request in progress is not closed"
        );
        drop(busy);
        assert!(conns.evict_one(None) && closed(&scrape_closed));
        assert!(!conns.evict_one(None));
    }

    #[test]
    fn the_client_with_most_connections_loses_one() {
        let conns = Conns::new();
        // B's keep-alive scraper, idle between scrapes, and A's flood of
        // requests newer than it.
        let (scraper, scraper_closed) = open(&conns, B);
        drop(scraper.request());
        let flood: Vec<_> = (0..5).map(|_| open(&conns, A)).collect();
        for (a, _) in &flood {
            drop(a.request());
        }
        for _ in 0..5 {
            assert!(conns.evict_one(Some(A)));
            assert!(!closed(&scraper_closed));
        }
        // One each, and B's newcomer counts: B's idle one goes.
        let (_, a_closed) = open(&conns, A);
        assert!(conns.evict_one(Some(B)) && closed(&scraper_closed) && !closed(&a_closed));
    }
}
