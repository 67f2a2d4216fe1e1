//! Failover: any number of consumers, one of them active. The active one is
//! chosen among those of the highest priority (the lowest
//! `priority_level`), sorted by consumer name: for partition `i` of a
//! partitioned topic the `i mod n`-th of them, for a topic without
//! partitions the first — so the partitions of a topic spread over the
//! consumers, and every broker picks the same one. Entries go to the active
//! consumer only, in order, within its permits. When the active consumer
//! changes (one joins or leaves), what the previous one had unacknowledged
//! goes to the new one (counted as a redelivery), and every consumer is told
//! whether it is active (ACTIVE_CONSUMER_CHANGE, sent by the subscription
//! task).

use std::time::Instant;

use magnetar_proto::pulsar::command_subscribe::SubType;

use super::dispatcher::{ConsumerInfo, ConsumerKey, Delivery, Dispatcher, EntrySource};
use super::redelivery::Unacked;
use crate::BrokerError;

pub struct Failover {
    /// Consumers in arrival order, with their permits.
    consumers: Vec<(ConsumerInfo, u32)>,
    /// The topic's partition index (`None`: not a partition).
    partition: Option<u32>,
    active: Option<ConsumerKey>,
    unacked: Unacked,
}

impl Failover {
    pub fn new(unacked: Unacked, partition: Option<u32>) -> Failover {
        Failover {
            consumers: Vec::new(),
            partition,
            active: None,
            unacked,
        }
    }

    /// Who should be active with the consumers there are now.
    fn choose(&self) -> Option<ConsumerKey> {
        let top = self.consumers.iter().map(|(c, _)| c.priority).min()?;
        let mut candidates: Vec<&ConsumerInfo> = self
            .consumers
            .iter()
            .map(|(c, _)| c)
            .filter(|c| c.priority == top)
            .collect();
        // Stable: consumers of the same name keep their arrival order.
        candidates.sort_by(|a, b| a.name.cmp(&b.name));
        let i = self.partition.unwrap_or(0) as usize % candidates.len();
        Some(candidates[i].key)
    }

    /// Re-chooses the active consumer; the previous one's unacknowledged
    /// entries go back for the new one.
    fn rechoose(&mut self) {
        let next = self.choose();
        if next != self.active {
            if let Some(old) = self.active {
                self.unacked.give_back(old);
            }
            self.active = next;
        }
    }
}

impl Dispatcher for Failover {
    fn sub_type(&self) -> SubType {
        SubType::Failover
    }

    fn add_consumer(&mut self, c: ConsumerInfo, _now: Instant) -> Result<(), BrokerError> {
        self.consumers.push((c, 0));
        self.rechoose();
        Ok(())
    }

    fn remove_consumer(&mut self, key: ConsumerKey, _now: Instant) {
        if let Some(i) = self.consumers.iter().position(|(c, _)| c.key == key) {
            self.consumers.remove(i);
            self.unacked.give_back(key);
            if self.active == Some(key) {
                self.active = None;
            }
            self.rechoose();
        }
    }

    fn consumers(&self) -> Vec<ConsumerKey> {
        self.consumers.iter().map(|(c, _)| c.key).collect()
    }

    fn active_consumer(&self) -> Option<ConsumerKey> {
        self.active
    }

    fn flow(&mut self, key: ConsumerKey, permits: u32) {
        if let Some((_, p)) = self.consumers.iter_mut().find(|(c, _)| c.key == key) {
            *p = p.saturating_add(permits);
        }
    }

    fn next(&mut self, src: &dyn EntrySource, _now: Instant) -> Option<Delivery> {
        let key = self.active?;
        let permits = self
            .consumers
            .iter()
            .find(|(c, _)| c.key == key)
            .map_or(0, |(_, p)| *p);
        if permits == 0 {
            return None;
        }
        self.unacked.deliver_to(key, src)
    }

    fn sent(&mut self, d: Delivery, messages: u32) {
        if let Some((_, p)) = self.consumers.iter_mut().find(|(c, _)| c.key == d.consumer) {
            *p = p.saturating_sub(messages);
        }
        self.unacked.delivered(d.position, d.consumer);
    }

    fn unacked(&mut self) -> &mut Unacked {
        &mut self.unacked
    }

    fn unacked_ref(&self) -> &Unacked {
        &self.unacked
    }

    fn into_unacked(self: Box<Self>) -> Unacked {
        self.unacked
    }
}

/// The partition index of a topic named `…-partition-<i>`.
pub fn partition_index(topic: &str) -> Option<u32> {
    let (_, i) = topic.rsplit_once("-partition-")?;
    i.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::testing::Entries;
    use super::*;
    use crate::managed_ledger::cursor::Position;

    fn c(id: u64, name: &str, priority: i32) -> ConsumerInfo {
        ConsumerInfo {
            key: (1, id),
            name: name.into(),
            priority,
            key_shared: Default::default(),
        }
    }

    use super::super::testing::deliver_counted as deliver_all;

    #[test]
    fn the_first_by_name_is_active_and_alone_gets_entries() {
        let now = Instant::now();
        let src = Entries::new(1, 4);
        let mut d = Failover::new(Unacked::new(Position::new(1, 0)), None);
        d.add_consumer(c(1, "b", 0), now).unwrap();
        assert_eq!(d.active_consumer(), Some((1, 1)));
        d.add_consumer(c(2, "a", 0), now).unwrap();
        assert_eq!(d.active_consumer(), Some((1, 2)), "'a' sorts first");
        d.flow((1, 1), 10);
        assert!(d.next(&src, now).is_none(), "the standby gets nothing");
        d.flow((1, 2), 10);
        let got = deliver_all(&mut d, &src, now);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![2; 4]);
    }

    #[test]
    fn priority_level_comes_before_the_name() {
        let now = Instant::now();
        let mut d = Failover::new(Unacked::new(Position::new(1, 0)), None);
        d.add_consumer(c(1, "a", 1), now).unwrap();
        d.add_consumer(c(2, "z", 0), now).unwrap();
        assert_eq!(d.active_consumer(), Some((1, 2)), "level 0 beats level 1");
        d.remove_consumer((1, 2), now);
        assert_eq!(d.active_consumer(), Some((1, 1)));
        d.remove_consumer((1, 1), now);
        assert_eq!(d.active_consumer(), None);
    }

    #[test]
    fn partitions_spread_over_the_consumers() {
        let now = Instant::now();
        let active = |partition| {
            let mut d = Failover::new(Unacked::new(Position::new(1, 0)), Some(partition));
            for (id, name) in [(1, "c"), (2, "a"), (3, "b")] {
                d.add_consumer(c(id, name, 0), now).unwrap();
            }
            d.active_consumer().unwrap().1
        };
        assert_eq!(
            (0..6).map(active).collect::<Vec<_>>(),
            vec![2, 3, 1, 2, 3, 1]
        );
        assert_eq!(partition_index("persistent://t/n/x-partition-7"), Some(7));
        assert_eq!(partition_index("persistent://t/n/x"), None);
        assert_eq!(partition_index("persistent://t/n/x-partition-"), None);
    }

    #[test]
    fn the_standby_takes_over_with_what_the_active_left_unacked() {
        let now = Instant::now();
        let mut src = Entries::new(1, 5);
        let mut d = Failover::new(Unacked::new(Position::new(1, 0)), None);
        d.add_consumer(c(1, "a", 0), now).unwrap();
        d.add_consumer(c(2, "b", 0), now).unwrap();
        d.flow((1, 1), 3);
        d.flow((1, 2), 10);
        assert_eq!(
            deliver_all(&mut d, &src, now),
            vec![(1, 0, 0), (1, 1, 0), (1, 2, 0)]
        );
        src.ack(Position::new(1, 1));
        d.acked(Position::new(1, 1));
        d.remove_consumer((1, 1), now);
        assert_eq!(d.active_consumer(), Some((1, 2)));
        assert_eq!(
            deliver_all(&mut d, &src, now),
            vec![(2, 0, 1), (2, 2, 1), (2, 3, 0), (2, 4, 0)],
            "0 and 2 again, counted; 1 was acknowledged"
        );
    }

    #[test]
    fn a_joining_consumer_that_becomes_active_gets_the_unacked_entries() {
        let now = Instant::now();
        let src = Entries::new(1, 2);
        let mut d = Failover::new(Unacked::new(Position::new(1, 0)), None);
        d.add_consumer(c(1, "b", 0), now).unwrap();
        d.flow((1, 1), 10);
        assert_eq!(deliver_all(&mut d, &src, now).len(), 2);
        d.add_consumer(c(2, "a", 0), now).unwrap();
        assert_eq!(d.active_consumer(), Some((1, 2)));
        d.flow((1, 2), 10);
        assert_eq!(deliver_all(&mut d, &src, now), vec![(2, 0, 1), (2, 1, 1)]);
    }
}
