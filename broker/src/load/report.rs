//! The load report a broker publishes with its registration: topics,
//! bundles, producers and message rates, per bundle too, from its topics'
//! counters (rates are differences between two reports).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use magnetar_proto::TopicName;

use crate::ownership::bundle::topic_hash;
use crate::ownership::registration::{BundleLoad, LoadReport};
use crate::topic::TopicRegistry;

/// Counters of each topic at the previous report.
#[derive(Default)]
pub struct Reporter {
    last: HashMap<TopicName, [u64; 4]>,
    at: Option<Instant>,
}

impl Reporter {
    pub fn report(&mut self, registry: &TopicRegistry) -> LoadReport {
        let now = Instant::now();
        let secs = self
            .at
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|s| *s > 0.0);
        self.at = Some(now);
        let owned = registry.ownership.owned();
        let mut r = LoadReport {
            bundles: owned.len() as u64,
            updated_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            ..Default::default()
        };
        let mut bundles: BTreeMap<String, BundleLoad> = owned
            .iter()
            .map(|(k, _)| (k.to_string(), BundleLoad::default()))
            .collect();
        let mut seen = HashMap::new();
        for t in registry.loaded() {
            let s = &t.stats;
            let now_counts = [
                s.msgs_in.load(Relaxed),
                s.bytes_in.load(Relaxed),
                s.out.msgs.load(Relaxed),
                s.out.bytes.load(Relaxed),
            ];
            let before = self.last.get(&t.name).copied().unwrap_or(now_counts);
            let rate = |i: usize| match secs {
                Some(secs) => now_counts[i].saturating_sub(before[i]) as f64 / secs,
                None => 0.0,
            };
            let (mi, bi, mo, bo) = (rate(0), rate(1), rate(2), rate(3));
            r.topics += 1;
            r.producers += t.producer_count() as u64;
            r.msg_rate_in += mi;
            r.bytes_rate_in += bi;
            r.msg_rate_out += mo;
            r.bytes_rate_out += bo;
            let hash = topic_hash(&t.name);
            let ns = t.name.namespace();
            if let Some((k, _)) = owned
                .iter()
                .find(|(k, _)| k.namespace == ns && k.range.contains(hash))
            {
                let b = bundles.entry(k.to_string()).or_default();
                b.topics += 1;
                b.msg_rate_in += mi;
                b.bytes_rate_in += bi;
                b.msg_rate_out += mo;
                b.bytes_rate_out += bo;
            }
            seen.insert(t.name.clone(), now_counts);
        }
        self.last = seen;
        r.bundle_loads = bundles;
        r
    }
}
