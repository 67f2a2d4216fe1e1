//! Shared: any number of consumers; entries go round-robin to those with
//! permits — of the highest priority (the lowest `priority_level`) that has
//! any, as Pulsar's consumer priority levels; a leaving consumer's
//! unacknowledged entries go to the others.

use std::time::Instant;

use magnetar_proto::pulsar::command_subscribe::SubType;

use super::dispatcher::{ConsumerInfo, ConsumerKey, Delivery, Dispatcher, EntrySource};
use super::redelivery::Unacked;
use crate::BrokerError;

pub struct Shared {
    /// Consumers in arrival order, with their permits.
    consumers: Vec<(ConsumerKey, u32)>,
    /// Each consumer's priority level.
    priorities: std::collections::HashMap<ConsumerKey, i32>,
    /// Whose turn it is.
    turn: usize,
    unacked: Unacked,
}

impl Shared {
    pub fn new(unacked: Unacked) -> Shared {
        Shared {
            consumers: Vec::new(),
            priorities: Default::default(),
            turn: 0,
            unacked,
        }
    }

    /// The next consumer with permits of the highest priority that has
    /// any, from whose turn it is.
    fn pick(&self) -> Option<usize> {
        let n = self.consumers.len();
        let level = |k: &ConsumerKey| self.priorities.get(k).copied().unwrap_or(0);
        let top = self
            .consumers
            .iter()
            .filter(|(_, p)| *p > 0)
            .map(|(k, _)| level(k))
            .min()?;
        (0..n)
            .map(|i| (self.turn + i) % n)
            .find(|&i| self.consumers[i].1 > 0 && level(&self.consumers[i].0) == top)
    }
}

impl Dispatcher for Shared {
    fn sub_type(&self) -> SubType {
        SubType::Shared
    }

    fn add_consumer(&mut self, c: ConsumerInfo, _now: Instant) -> Result<(), BrokerError> {
        self.consumers.push((c.key, 0));
        self.priorities.insert(c.key, c.priority);
        Ok(())
    }

    fn remove_consumer(&mut self, key: ConsumerKey, _now: Instant) {
        if let Some(i) = self.consumers.iter().position(|(k, _)| *k == key) {
            self.consumers.remove(i);
            self.priorities.remove(&key);
            if self.turn > i {
                self.turn -= 1;
            }
            self.unacked.give_back(key);
        }
    }

    fn consumers(&self) -> Vec<ConsumerKey> {
        self.consumers.iter().map(|(k, _)| *k).collect()
    }

    fn flow(&mut self, key: ConsumerKey, permits: u32) {
        if let Some((_, p)) = self.consumers.iter_mut().find(|(k, _)| *k == key) {
            *p = p.saturating_add(permits);
        }
    }

    fn next(&mut self, src: &dyn EntrySource, _now: Instant) -> Option<Delivery> {
        let i = self.pick()?;
        let d = self.unacked.deliver_to(self.consumers[i].0, src)?;
        // The turn moves on only when something was handed out.
        self.turn = (i + 1) % self.consumers.len();
        Some(d)
    }

    fn sent(&mut self, d: Delivery, messages: u32) {
        if let Some((_, p)) = self.consumers.iter_mut().find(|(k, _)| *k == d.consumer) {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{consumer as info, Entries};
    use super::*;
    use crate::managed_ledger::cursor::Position;

    use super::super::testing::deliver_counted as deliver_all;

    #[test]
    fn round_robin_within_permits() {
        let now = Instant::now();
        let src = Entries::new(1, 7);
        let mut d = Shared::new(Unacked::new(Position::new(1, 0)));
        for id in 1..=3 {
            d.add_consumer(info(id), now).unwrap();
        }
        d.flow((1, 1), 1);
        d.flow((1, 2), 5);
        d.flow((1, 3), 5);
        let got = deliver_all(&mut d, &src, now);
        let whom: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(whom, vec![1, 2, 3, 2, 3, 2, 3], "c1 had one permit");
        let entries: Vec<i64> = got.iter().map(|g| g.1).collect();
        assert_eq!(entries, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn a_leaving_consumers_entries_go_to_the_others_and_nacks_come_back() {
        let now = Instant::now();
        let mut src = Entries::new(1, 4);
        let mut d = Shared::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(info(1), now).unwrap();
        d.add_consumer(info(2), now).unwrap();
        d.flow((1, 1), 2);
        d.flow((1, 2), 2);
        deliver_all(&mut d, &src, now); // c1: 0, 2; c2: 1, 3
        src.ack(Position::new(1, 1));
        d.acked(Position::new(1, 1));
        d.redeliver((1, 2), Some(&[Position::new(1, 3), Position::new(1, 0)]));
        d.remove_consumer((1, 1), now);
        d.flow((1, 2), 10);
        let got = deliver_all(&mut d, &src, now);
        assert_eq!(
            got,
            vec![(2, 0, 1), (2, 2, 1), (2, 3, 1)],
            "c1's 0 and 2 plus c2's own nacked 3 (its nack of 0 was not its own)"
        );
        assert!(deliver_all(&mut d, &src, now).is_empty());
    }

    #[test]
    fn acked_entries_are_not_redelivered_and_no_consumers_means_nothing() {
        let now = Instant::now();
        let mut src = Entries::new(1, 3);
        let mut d = Shared::new(Unacked::new(Position::new(1, 0)));
        assert!(d.next(&src, now).is_none());
        d.add_consumer(info(1), now).unwrap();
        d.flow((1, 1), 3);
        deliver_all(&mut d, &src, now);
        d.redeliver((1, 1), None);
        src.ack(Position::new(1, 0));
        src.ack(Position::new(1, 1));
        d.acked_through(Position::new(1, 1));
        d.flow((1, 1), 3);
        assert_eq!(deliver_all(&mut d, &src, now), vec![(1, 2, 1)]);
    }

    #[test]
    fn higher_priority_consumers_are_served_first_while_they_have_permits() {
        let now = Instant::now();
        let src = Entries::new(1, 6);
        let mut d = Shared::new(Unacked::new(Position::new(1, 0)));
        let with_level = |id, priority| ConsumerInfo {
            priority,
            ..info(id)
        };
        d.add_consumer(with_level(1, 1), now).unwrap();
        d.add_consumer(with_level(2, 0), now).unwrap();
        d.add_consumer(with_level(3, 0), now).unwrap();
        d.flow((1, 1), 10);
        d.flow((1, 2), 2);
        d.flow((1, 3), 1);
        let whom: Vec<u64> = deliver_all(&mut d, &src, now).iter().map(|g| g.0).collect();
        assert_eq!(
            whom,
            vec![2, 3, 2, 1, 1, 1],
            "level 0 until its permits run out"
        );
    }
}
