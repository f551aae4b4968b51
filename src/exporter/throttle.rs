//! Back-off for clients whose passwords fail: after [`FREE_FAILURES`]
//! wrong passwords a client (told apart by address) waits [`FIRST_DELAY`]
//! before its next one is checked, twice as long after each further
//! failure up to [`MAX_DELAY`]; meanwhile it gets 429 with Retry-After,
//! which costs no bcrypt check. A client has one check at a time. A right
//! password clears its record. Only checks count: credentials remembered
//! (right or wrong) are answered without one, so a scraper whose password
//! verified before is never held up, and another client's failures never
//! hold up anyone else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Wrong passwords a client may try before it is slowed down.
pub const FREE_FAILURES: u32 = 3;
/// Its first wait.
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Its longest wait.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// A client without failures for this long is forgotten.
const FORGET: Duration = Duration::from_secs(600);
/// Clients remembered at most (the oldest are forgotten first).
const MAX_CLIENTS: usize = 4096;

#[derive(Debug)]
struct Client {
    failures: u32,
    until: Option<Instant>,
    checking: bool,
    last: Instant,
}

/// Every client's failures.
#[derive(Default)]
pub struct Throttle {
    clients: Mutex<HashMap<IpAddr, Client>>,
}

/// Leave to check one password of `peer`; report the outcome with
/// [`Ticket::done`] (dropped without, it only ends the check).
pub struct Ticket {
    throttle: Arc<Throttle>,
    peer: IpAddr,
}

impl Throttle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket to check a password of `peer` now, or how long it must wait.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Result<Ticket, Duration> {
        let mut clients = self.lock();
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&peer) {
            clients.retain(|_, c| c.checking || now.duration_since(c.last) < FORGET);
            if clients.len() >= MAX_CLIENTS
                && let Some(oldest) = clients
                    .iter()
                    .filter(|(_, c)| !c.checking)
                    .min_by_key(|(_, c)| c.last)
                    .map(|(p, _)| *p)
            {
                clients.remove(&oldest);
            }
        }
        let c = clients.entry(peer).or_insert(Client {
            failures: 0,
            until: None,
            checking: false,
            last: now,
        });
        if c.checking {
            return Err(FIRST_DELAY);
        }
        if let Some(until) = c.until.filter(|u| *u > now) {
            return Err(until - now);
        }
        c.checking = true;
        c.last = now;
        Ok(Ticket {
            throttle: Arc::clone(self),
            peer,
        })
    }
}

impl Ticket {
    /// The password was right (`ok`) or wrong.
    pub fn done(self, ok: bool, now: Instant) {
        let mut clients = self.throttle.lock();
        if ok {
            clients.remove(&self.peer);
        } else if let Some(c) = clients.get_mut(&self.peer) {
            c.failures += 1;
            c.last = now;
            if c.failures >= FREE_FAILURES {
                let doublings = (c.failures - FREE_FAILURES).min(16);
                c.until = Some(now + (FIRST_DELAY * (1u32 << doublings)).min(MAX_DELAY));
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(c) = self.throttle.lock().get_mut(&self.peer) {
            c.checking = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn failures_slow_down_their_client_only() {
        let t = Arc::new(Throttle::default());
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            t.admit(A, now).unwrap().done(false, now);
        }
        assert_eq!(t.admit(A, now).err(), Some(FIRST_DELAY));
        assert!(t.admit(B, now).is_ok(), "another client is not held up");
        let later = now + FIRST_DELAY;
        t.admit(A, later).unwrap().done(false, later);
        assert_eq!(t.admit(A, later).err(), Some(2 * FIRST_DELAY));
        let mut at = later;
        for _ in 0..20 {
            at += MAX_DELAY;
            t.admit(A, at).unwrap().done(false, at);
        }
        assert_eq!(t.admit(A, at).err(), Some(MAX_DELAY));
        let end = at + MAX_DELAY;
        t.admit(A, end).unwrap().done(true, end);
        assert!(
            t.admit(A, end).is_ok(),
            "a right password clears the record"
        );
    }

    #[test]
    fn one_check_at_a_time_per_client() {
        let t = Arc::new(Throttle::default());
        let now = Instant::now();
        let first = t.admit(A, now).unwrap();
        assert!(t.admit(A, now).is_err());
        assert!(t.admit(B, now).is_ok());
        drop(first);
        assert!(t.admit(A, now).is_ok());
    }
}
