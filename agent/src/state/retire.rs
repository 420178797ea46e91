//! Where old snapshots are freed. Whoever drops the last reference to a
//! snapshot frees it, and at 20,000 pods that takes about 14 ms: done on a
//! proxy worker (a health-check task or a connection that held the old
//! snapshot), it stalls every connection that worker serves. The state
//! thread keeps a reference to each snapshot it publishes and frees it once
//! it holds the only one left, so the worker never has the last.

use std::sync::Arc;

/// Published values, kept until no one else holds them.
pub struct Retired<T> {
    held: Vec<Arc<T>>,
}

impl<T> Default for Retired<T> {
    fn default() -> Self {
        Self { held: Vec::new() }
    }
}

impl<T> Retired<T> {
    /// Keeps a reference to `value`, which is being handed out.
    pub fn keep(&mut self, value: &Arc<T>) {
        self.held.push(value.clone());
    }

    /// Frees, here, those no one else holds any more; returns how many.
    /// A value only this list holds cannot be reached again (no `Weak`
    /// references are made to them), so the count is not racy.
    pub fn release(&mut self) -> usize {
        let before = self.held.len();
        self.held.retain(|v| Arc::strong_count(v) > 1);
        before - self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts where it is dropped.
    struct Marked(std::sync::mpsc::Sender<std::thread::ThreadId>);

    impl Drop for Marked {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    #[test]
    fn the_last_reference_is_dropped_by_the_keeper_not_the_user() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut retired = Retired::default();
        let value = Arc::new(Marked(tx));
        retired.keep(&value);
        // A "worker" uses the value and lets it go.
        std::thread::spawn(move || drop(value))
            .join()
            .expect("worker");
        assert!(rx.try_recv().is_err(), "not freed by the worker");
        assert_eq!(retired.release(), 1);
        assert_eq!(
            rx.try_recv().expect("freed"),
            std::thread::current().id(),
            "freed by the keeper"
        );
    }

    #[test]
    fn values_still_used_are_kept() {
        let mut retired = Retired::default();
        let (a, b) = (Arc::new(1), Arc::new(2));
        retired.keep(&a);
        retired.keep(&b);
        drop(a);
        assert_eq!(retired.release(), 1, "a is freed, b still held");
        assert_eq!(Arc::strong_count(&b), 2);
    }
}
