//! Single-flight: however many callers ask for the same key at once, one
//! future does the work and all of them get its result.
//!
//! Contract: while a flight for `key` is running, later callers join it
//! instead of starting another. When it finishes the key is forgotten, so
//! results (including errors) are not cached here: callers cache successes
//! themselves. Waiters never hold a lock while waiting.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// A set of in-flight computations keyed by `K`, each yielding `V`.
pub struct Flights<K, V> {
    running: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Flights<K, V> {
    /// Runs `make()` unless a flight for `key` is already running, in which
    /// case waits for that one. Every caller gets a clone of the result.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut map = self.running.lock().unwrap();
            map.entry(key.clone())
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let v = cell.get_or_init(make).await.clone();
        let mut map = self.running.lock().unwrap();
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flight_for_many_callers() {
        let f: Arc<Flights<u32, u32>> = Arc::new(Flights::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut hs = Vec::new();
        for _ in 0..16 {
            let (f, calls) = (f.clone(), calls.clone());
            hs.push(tokio::spawn(async move {
                f.run(1, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        for h in hs {
            assert_eq!(h.await.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // finished flights are forgotten: a new call runs again
        f.run(1, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            8
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
