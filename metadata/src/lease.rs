//! The leader's lease clock. Keep-alives stay on the leader (they are not
//! logged); expiry is decided here and committed through the log. A leader
//! gives every lease a fresh TTL when it takes office, so a leader change can
//! delay an expiry but never bring one forward.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::state::Lease;

#[derive(Debug, Default)]
pub struct LeaseTracker {
    deadlines: HashMap<u64, Instant>,
    leader: bool,
}

impl LeaseTracker {
    /// Tells the tracker whether this node leads now.
    pub fn set_leader(&mut self, is_leader: bool) {
        if is_leader != self.leader {
            self.deadlines.clear();
            self.leader = is_leader;
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    pub fn keep_alive(&mut self, id: u64, ttl_ms: u64, now: Instant) {
        self.deadlines
            .insert(id, now + Duration::from_millis(ttl_ms));
    }

    /// Leases in `leases` whose deadline passed. Leases new to the tracker get
    /// a full TTL from `now`; leases gone from the store are forgotten.
    pub fn expired(&mut self, leases: &BTreeMap<u64, Lease>, now: Instant) -> Vec<u64> {
        if !self.leader {
            return Vec::new();
        }
        self.deadlines.retain(|id, _| leases.contains_key(id));
        let mut out = Vec::new();
        for (id, lease) in leases {
            let d = *self
                .deadlines
                .entry(*id)
                .or_insert(now + Duration::from_millis(lease.ttl_ms));
            if d <= now {
                out.push(*id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(ids: &[u64]) -> BTreeMap<u64, Lease> {
        ids.iter()
            .map(|id| {
                (
                    *id,
                    Lease {
                        ttl_ms: 1000,
                        keys: Default::default(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn expires_only_after_ttl_without_keepalive() {
        let t0 = Instant::now();
        let mut t = LeaseTracker::default();
        t.set_leader(true);
        let l = leases(&[1, 2]);
        assert!(t.expired(&l, t0).is_empty());
        t.keep_alive(1, 1000, t0 + Duration::from_millis(900));
        assert_eq!(t.expired(&l, t0 + Duration::from_millis(1000)), vec![2]);
        assert!(t
            .expired(&leases(&[1]), t0 + Duration::from_millis(1800))
            .is_empty());
        assert_eq!(
            t.expired(&leases(&[1]), t0 + Duration::from_millis(1900)),
            vec![1]
        );
    }

    #[test]
    fn new_leader_grants_a_fresh_ttl() {
        let t0 = Instant::now();
        let mut t = LeaseTracker::default();
        t.set_leader(true);
        let l = leases(&[1]);
        t.expired(&l, t0);
        t.set_leader(false);
        assert!(t.expired(&l, t0 + Duration::from_secs(5)).is_empty());
        t.set_leader(true);
        // Leadership began at t0+5s: the lease lives until t0+6s.
        assert!(t.expired(&l, t0 + Duration::from_secs(5)).is_empty());
        assert!(t.expired(&l, t0 + Duration::from_millis(5999)).is_empty());
        assert_eq!(t.expired(&l, t0 + Duration::from_secs(6)), vec![1]);
    }
}
