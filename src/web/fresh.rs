//! A read that is too costly to run for every page view, kept as a
//! snapshot and refreshed behind the pages' back (stale-while-revalidate).
//!
//! Why: the overview's latest outcome of every minion costs one index seek
//! per minion (2,000 minions: ~70-120 ms on PostgreSQL on the shared test
//! machine), and its per-hour counts read every return of 48 h. Those
//! figures move slowly, so a view younger than [`Fresh::fresh_for`] is
//! served as it is; an older one is still served (up to
//! [`Fresh::serve_for`]) while one background task reads a new one; only
//! the first view, or one after a long idle spell, waits for the database.
//! The page says how old what it shows is.

use super::store::StoreError;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One snapshot of `T`, refreshed on demand.
pub struct Fresh<T> {
    slot: tokio::sync::Mutex<Option<(Instant, Arc<T>)>>,
    refreshing: AtomicBool,
    /// Served without a refresh while younger than this.
    pub fresh_for: Duration,
    /// Served at all (with a refresh in the background) while younger than
    /// this; older, the view waits for a new read.
    pub serve_for: Duration,
}

impl<T: Send + Sync + 'static> Fresh<T> {
    pub fn new(fresh_for: Duration, serve_for: Duration) -> Fresh<T> {
        Fresh {
            slot: tokio::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
            fresh_for,
            serve_for,
        }
    }

    /// The snapshot and its age; reads (with `load`) when there is none
    /// young enough, refreshes in the background when it is getting old.
    pub async fn get<F, Fut>(self: &Arc<Self>, load: F) -> Result<(Arc<T>, Duration), StoreError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let mut slot = self.slot.lock().await;
        if let Some((at, v)) = slot.as_ref() {
            let age = at.elapsed();
            if age < self.fresh_for {
                return Ok((v.clone(), age));
            }
            if age < self.serve_for {
                let v = v.clone();
                drop(slot);
                self.refresh_in_background(load);
                return Ok((v, age));
            }
        }
        // None, or too old to show: this view waits (others wait on the lock).
        let v = Arc::new(load().await?);
        *slot = Some((Instant::now(), v.clone()));
        Ok((v, Duration::ZERO))
    }

    fn refresh_in_background<F, Fut>(self: &Arc<Self>, load: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            match load().await {
                Ok(v) => *me.slot.lock().await = Some((Instant::now(), Arc::new(v))),
                Err(e) => tracing::warn!(error = %e, "web: refreshing a page's figures failed"),
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn serves_fresh_refreshes_stale_reloads_old() {
        let reads = Arc::new(AtomicU32::new(0));
        let load = {
            let reads = reads.clone();
            move || {
                let reads = reads.clone();
                async move { Ok::<u32, StoreError>(reads.fetch_add(1, Ordering::SeqCst) + 1) }
            }
        };
        let f = Arc::new(Fresh::new(
            Duration::from_millis(50),
            Duration::from_secs(60),
        ));
        assert_eq!(*f.get(load.clone()).await.expect("first").0, 1);
        assert_eq!(*f.get(load.clone()).await.expect("fresh").0, 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Stale: the old value now, a new one read behind it.
        assert_eq!(*f.get(load.clone()).await.expect("stale").0, 1);
        for _ in 0..100 {
            if reads.load(Ordering::SeqCst) == 2 && !f.refreshing.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*f.get(load.clone()).await.expect("refreshed").0, 2);
        // Too old to show: the view waits for a new read.
        let old = Arc::new(Fresh::new(Duration::ZERO, Duration::ZERO));
        assert_eq!(*old.get(load.clone()).await.expect("a").0, 3);
        assert_eq!(*old.get(load).await.expect("b").0, 4);
    }
}
