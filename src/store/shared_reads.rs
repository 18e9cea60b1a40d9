//! Store reads that concurrent callers share.
//!
//! After a pod restart every client comes back at once: most present the same API
//! key and resume from the same event. Each doing its own read ran the pool dry in
//! the storm bench, and the requests that timed out came back again. Here a caller
//! joins the pending read of its key when that read cannot be staler than the
//! caller may accept, and few reads of one kind run at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, Semaphore};

use super::StoreError;

/// Finished reads older than this are forgotten (no caller can join them any more).
const READ_KEPT: Duration = Duration::from_secs(5);
/// How often the forgetting runs: not on every new read, which would be a walk over
/// every key for each one when callers mostly ask for different keys.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A caller joins the read of its key that has not begun yet, or that began no
/// earlier than the caller's `not_before` (so it sees whatever committed before the
/// caller asked); otherwise it starts one. At most `at_once` reads run together;
/// during a storm the rest wait as one pending read per key that newcomers join.
pub struct SharedReads<K, V> {
    reads: Mutex<Reads<K, V>>,
    running: Semaphore,
}

struct Reads<K, V> {
    by_key: HashMap<K, Arc<Read<V>>>,
    swept: Instant,
}

struct Read<V> {
    created: Instant,
    /// Set just before the query is sent: its snapshot is no older than this.
    began: OnceLock<Instant>,
    value: OnceCell<Result<V, Arc<StoreError>>>,
}

impl<K: Copy + Eq + Hash, V: Clone> SharedReads<K, V> {
    pub fn new(at_once: usize) -> Self {
        Self {
            reads: Mutex::new(Reads {
                by_key: HashMap::new(),
                swept: Instant::now(),
            }),
            running: Semaphore::new(at_once),
        }
    }

    /// The value of `key`, read by `read` or by a caller's read this one may share.
    pub async fn get<F, Fut>(
        &self,
        key: K,
        not_before: Instant,
        read: F,
    ) -> Result<V, Arc<StoreError>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, StoreError>>,
    {
        let shared = {
            let mut reads = lock(&self.reads);
            let joinable = |r: &Read<V>| r.began.get().is_none_or(|began| *began >= not_before);
            match reads.by_key.get(&key) {
                Some(r) if joinable(r) => r.clone(),
                _ => {
                    let now = Instant::now();
                    if now.duration_since(reads.swept) >= SWEEP_EVERY {
                        reads
                            .by_key
                            .retain(|_, r| now.duration_since(r.created) < READ_KEPT);
                        reads.swept = now;
                    }
                    let r = Arc::new(Read {
                        created: now,
                        began: OnceLock::new(),
                        value: OnceCell::new(),
                    });
                    reads.by_key.insert(key, r.clone());
                    r
                }
            }
        };
        shared
            .value
            .get_or_init(|| async {
                // Closed never: the semaphore lives as long as `self`.
                let _permit = self.running.acquire().await.ok();
                let _ = shared.began.set(Instant::now());
                read().await.map_err(Arc::new)
            })
            .await
            .clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callers_share_a_read_unless_it_began_before_they_asked() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let reads: SharedReads<u8, usize> = SharedReads::new(4);
        let count = AtomicUsize::new(0);
        let read = || async {
            tokio::task::yield_now().await;
            Ok(count.fetch_add(1, Ordering::SeqCst))
        };
        let early = Instant::now();
        let (a, b) = tokio::join!(reads.get(1, early, read), reads.get(1, early, read));
        assert_eq!((a.unwrap(), b.unwrap()), (0, 0), "one read for both");
        // A caller that asked after that read began must not take its result.
        let late = Instant::now();
        assert_eq!(reads.get(1, late, read).await.unwrap(), 1);
        assert_eq!(reads.get(2, early, read).await.unwrap(), 2, "another key");
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }
}
