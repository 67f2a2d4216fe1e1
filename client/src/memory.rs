//! The client's memory limit: bytes of message payloads its producers hold
//! until the broker has them (Pulsar's `memoryLimitBytes`). A send that
//! would go beyond it fails at once with `ProducerQueueFull` instead of
//! letting a slow broker grow the application's memory without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct MemoryLimit {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes taken from the limit, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    limit: Arc<MemoryLimit>,
    bytes: usize,
}

impl MemoryLimit {
    pub fn new(limit: usize) -> Arc<MemoryLimit> {
        Arc::new(MemoryLimit {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes`, unless that would go beyond the limit.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let now = used.checked_add(bytes)?;
                (now <= self.limit).then_some(now)
            })
            .ok()?;
        Some(Reservation {
            limit: self.clone(),
            bytes,
        })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.limit.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back() {
        let m = MemoryLimit::new(100);
        let a = m.reserve(60).unwrap();
        assert!(m.reserve(41).is_none());
        let b = m.reserve(40).unwrap();
        assert_eq!(m.used(), 100);
        drop(a);
        assert_eq!(m.used(), 40);
        assert!(m.reserve(60).is_some(), "given back on drop");
        drop(b);
        assert_eq!(m.used(), 0);
        assert!(m.reserve(usize::MAX).is_none());
    }
}
