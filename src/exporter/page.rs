//! The metrics page, made once and shared: a scrape gets the last page made
//! if it is younger than [`MAX_AGE`]; otherwise one scrape makes a new one
//! (on the blocking pool) while the others that need one wait for it,
//! without a thread each, and take it. So N clients scraping at once cost
//! one encoding, not N queued on two threads, and at most one page is being
//! made at any time. The once-a-second refresh between scrapes goes through
//! the same gate and is skipped while a page is being made (making one
//! refreshes anyway): a scrape never queues behind it. Each exposition
//! format has its own last page: a text-format scrape is never given an
//! OpenMetrics page, nor the other way round.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Bytes;

use super::format::Format;

/// Oldest page a scrape is given.
pub const MAX_AGE: Duration = Duration::from_millis(500);

/// Makes the page's text in a format (slow: run it off the HTTP thread).
pub type Make = Arc<dyn Fn(Format) -> anyhow::Result<String> + Send + Sync>;

/// The last page of each format and the gate to making the next.
pub struct Pages {
    make: Make,
    latest: Mutex<[Option<(Instant, Bytes)>; Format::ALL.len()]>,
    making: tokio::sync::Mutex<()>,
    max_age: Duration,
}

impl Pages {
    /// Pages made by `make`, given out while younger than `max_age`.
    pub fn new(make: Make, max_age: Duration) -> Self {
        Pages {
            make,
            latest: Mutex::new(Default::default()),
            making: tokio::sync::Mutex::new(()),
            max_age,
        }
    }

    fn fresh(&self, format: Format) -> Option<Bytes> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest[format.index()]
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.max_age)
            .map(|(_, body)| body.clone())
    }

    /// A page in `format` no older than the limit: the last one, the one
    /// being made, or a new one.
    pub async fn get(&self, format: Format) -> anyhow::Result<Bytes> {
        if let Some(body) = self.fresh(format) {
            return Ok(body);
        }
        let _turn = self.making.lock().await;
        // Made while this one waited its turn.
        if let Some(body) = self.fresh(format) {
            return Ok(body);
        }
        let at = Instant::now();
        let make = Arc::clone(&self.make);
        let text = tokio::task::spawn_blocking(move || make(format))
            .await
            .map_err(|e| anyhow::anyhow!("the page was not made: {e}"))??;
        let body = Bytes::from(text);
        self.latest.lock().unwrap_or_else(|e| e.into_inner())[format.index()] =
            Some((at, body.clone()));
        Ok(body)
    }

    /// Runs `work` (on the blocking pool) unless a page is being made.
    pub async fn between<F: FnOnce() + Send + 'static>(&self, work: F) {
        if let Ok(_turn) = self.making.try_lock() {
            let _ = tokio::task::spawn_blocking(work).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(delay: Duration) -> (Arc<AtomicUsize>, Make) {
        let n = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&n);
        let make: Make = Arc::new(move |format| {
            std::thread::sleep(delay);
            Ok(format!(
                "{format:?} page {}",
                c.fetch_add(1, Ordering::SeqCst)
            ))
        });
        (n, make)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(2)
            .build()
            .unwrap()
    }

    #[test]
    fn concurrent_scrapes_share_one_page() {
        let (made, make) = counting(Duration::from_millis(100));
        let pages = Arc::new(Pages::new(make, Duration::from_secs(60)));
        let bodies = runtime().block_on(async {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let p = Arc::clone(&pages);
                    tokio::spawn(async move { p.get(Format::OpenMetrics).await.unwrap() })
                })
                .collect();
            let mut bodies = Vec::new();
            for t in tasks {
                bodies.push(t.await.unwrap());
            }
            bodies
        });
        assert_eq!(made.load(Ordering::SeqCst), 1);
        assert!(bodies.iter().all(|b| b.as_ref() == b"OpenMetrics page 0"));
    }

    #[test]
    fn an_old_page_is_made_again() {
        let (made, make) = counting(Duration::ZERO);
        let pages = Pages::new(make, Duration::from_millis(20));
        let rt = runtime();
        let get = |f| rt.block_on(pages.get(f)).unwrap();
        assert_eq!(get(Format::Text).as_ref(), b"Text page 0");
        assert_eq!(get(Format::Text).as_ref(), b"Text page 0");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(get(Format::Text).as_ref(), b"Text page 1");
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn each_format_has_its_own_page() {
        let (made, make) = counting(Duration::ZERO);
        let pages = Pages::new(make, Duration::from_secs(60));
        let rt = runtime();
        let get = |f| rt.block_on(pages.get(f)).unwrap();
        assert_eq!(get(Format::Text).as_ref(), b"Text page 0");
        assert_eq!(get(Format::OpenMetrics).as_ref(), b"OpenMetrics page 1");
        assert_eq!(get(Format::Text).as_ref(), b"Text page 0");
        assert_eq!(get(Format::OpenMetrics).as_ref(), b"OpenMetrics page 1");
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_refresh_is_skipped_while_a_page_is_made() {
        let (_, make) = counting(Duration::from_millis(200));
        let pages = Arc::new(Pages::new(make, Duration::from_secs(60)));
        let ran = Arc::new(AtomicUsize::new(0));
        runtime().block_on(async {
            let p = Arc::clone(&pages);
            let scrape = tokio::spawn(async move { p.get(Format::Text).await.unwrap() });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let r = Arc::clone(&ran);
            pages
                .between(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                })
                .await;
            scrape.await.unwrap();
            let r = Arc::clone(&ran);
            pages
                .between(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                })
                .await;
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
