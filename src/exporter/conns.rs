//! The open connections of the exporter and which one to close when there
//! are too many (or when accept() runs out of file descriptors): a client
//! that never sent a request goes first, oldest first; otherwise the one
//! whose last request started longest ago. A scrape in progress is the last
//! to go, so connections an attacker holds open cannot lock scrapes out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a connection task reports about itself.
#[derive(Debug)]
pub struct Activity {
    /// Requests started on it.
    requests: AtomicU64,
    /// When the last one started, in microseconds since the table's epoch.
    last_request_us: AtomicU64,
    epoch: Instant,
}

impl Activity {
    /// A request starts on this connection; returns how many did so far.
    pub fn request(&self) -> u64 {
        let us = self.epoch.elapsed().as_micros() as u64;
        self.last_request_us.store(us, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
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
            last_request_us: AtomicU64::new(0),
            epoch: self.epoch,
        });
        (id, activity)
    }

    /// Records the open connection `id`.
    pub fn admit(&self, id: u64, activity: Arc<Activity>, close: Box<dyn Close>) {
        self.lock().insert(id, Entry { activity, close });
    }

    /// Forgets connection `id` (it ended).
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes the connection that matters least (see the module docs);
    /// false if there is none.
    pub fn evict_one(&self) -> bool {
        let mut map = self.lock();
        let idle = map
            .iter()
            .find(|(_, e)| e.activity.requests.load(Ordering::Relaxed) == 0)
            .map(|(id, _)| *id);
        let victim = idle.or_else(|| {
            map.iter()
                .min_by_key(|(_, e)| e.activity.last_request_us.load(Ordering::Relaxed))
                .map(|(id, _)| *id)
        });
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

    fn open(conns: &Conns) -> (Arc<Activity>, Arc<AtomicBool>) {
        let (id, a) = conns.reserve();
        let closed = Arc::new(AtomicBool::new(false));
        conns.admit(id, Arc::clone(&a), Box::new(Flag(Arc::clone(&closed))));
        (a, closed)
    }

    #[test]
    fn silent_clients_go_first_then_the_least_recently_active() {
        let conns = Conns::new();
        let (scrape, scrape_closed) = open(&conns);
        let (_, silent1) = open(&conns);
        let (stuck, stuck_closed) = open(&conns);
        let (_, silent2) = open(&conns);
        stuck.request();
        std::thread::sleep(std::time::Duration::from_millis(2));
        scrape.request();
        assert!(conns.evict_one() && silent1.load(Ordering::Relaxed));
        assert!(conns.evict_one() && silent2.load(Ordering::Relaxed));
        assert!(conns.evict_one() && stuck_closed.load(Ordering::Relaxed));
        assert!(!scrape_closed.load(Ordering::Relaxed));
        assert_eq!(conns.len(), 1);
        assert!(conns.evict_one() && scrape_closed.load(Ordering::Relaxed));
        assert!(!conns.evict_one());
    }
}
