//! Exclusive: one consumer at a time; a second is refused with ConsumerBusy.
//! Entries go to it in order, within its permits.

use std::time::Instant;

use magnetar_proto::pulsar::{command_subscribe::SubType, ServerError};

use super::dispatcher::{ConsumerInfo, ConsumerKey, Delivery, Dispatcher, EntrySource};
use super::redelivery::Unacked;
use crate::BrokerError;

pub struct Exclusive {
    consumer: Option<(ConsumerKey, u32)>,
    unacked: Unacked,
}

impl Exclusive {
    pub fn new(unacked: Unacked) -> Exclusive {
        Exclusive {
            consumer: None,
            unacked,
        }
    }
}

impl Dispatcher for Exclusive {
    fn sub_type(&self) -> SubType {
        SubType::Exclusive
    }

    fn add_consumer(&mut self, c: ConsumerInfo, _now: Instant) -> Result<(), BrokerError> {
        if self.consumer.is_some() {
            return Err(BrokerError::new(
                ServerError::ConsumerBusy,
                "Exclusive subscription already has a consumer",
            ));
        }
        self.consumer = Some((c.key, 0));
        Ok(())
    }

    fn remove_consumer(&mut self, key: ConsumerKey, _now: Instant) {
        if self.consumer.is_some_and(|(k, _)| k == key) {
            self.consumer = None;
            self.unacked.give_back(key);
        }
    }

    fn consumers(&self) -> Vec<ConsumerKey> {
        self.consumer.iter().map(|(k, _)| *k).collect()
    }

    fn flow(&mut self, key: ConsumerKey, permits: u32) {
        if let Some((k, p)) = &mut self.consumer {
            if *k == key {
                *p = p.saturating_add(permits);
            }
        }
    }

    fn next(&mut self, src: &dyn EntrySource, _now: Instant) -> Option<Delivery> {
        let (key, permits) = self.consumer?;
        if permits == 0 {
            return None;
        }
        self.unacked.deliver_to(key, src)
    }

    fn sent(&mut self, d: Delivery, messages: u32) {
        if let Some((k, p)) = &mut self.consumer {
            if *k == d.consumer {
                *p = p.saturating_sub(messages);
            }
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
    use super::super::testing::{consumer, drain, Entries};
    use super::*;
    use crate::managed_ledger::cursor::Position;

    #[test]
    fn one_consumer_in_order_within_permits_and_a_second_is_refused() {
        let now = Instant::now();
        let src = Entries::new(1, 5);
        let mut d = Exclusive::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(consumer(1), now).unwrap();
        let err = d.add_consumer(consumer(2), now).unwrap_err();
        assert_eq!(err.code(), ServerError::ConsumerBusy);
        assert!(d.next(&src, now).is_none(), "no permits yet");
        d.flow((1, 1), 3);
        let got = drain(&mut d, &src, now);
        assert_eq!(got, vec![(1, 0), (1, 1), (1, 2)]);
        d.flow((1, 1), 10);
        assert_eq!(drain(&mut d, &src, now), vec![(1, 3), (1, 4)]);
    }

    #[test]
    fn a_leaving_consumers_unacked_entries_go_to_the_next_one_counted() {
        let now = Instant::now();
        let mut src = Entries::new(1, 4);
        let mut d = Exclusive::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(consumer(1), now).unwrap();
        d.flow((1, 1), 10);
        drain(&mut d, &src, now);
        src.ack(Position::new(1, 1));
        d.acked(Position::new(1, 1));
        d.remove_consumer((1, 1), now);
        d.add_consumer(consumer(2), now).unwrap();
        d.flow((1, 2), 10);
        let mut again = Vec::new();
        while let Some(x) = d.next(&src, now) {
            again.push((x.position.entry_id, x.redelivery_count));
            d.sent(x, 1);
        }
        assert_eq!(again, vec![(0, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn a_batch_uses_one_permit_per_message_and_rewind_starts_over() {
        let now = Instant::now();
        let src = Entries::new(1, 3);
        let mut d = Exclusive::new(Unacked::new(Position::new(1, 0)));
        d.add_consumer(consumer(1), now).unwrap();
        d.flow((1, 1), 10);
        let x = d.next(&src, now).unwrap();
        d.sent(x, 10);
        assert!(d.next(&src, now).is_none(), "ten messages used ten permits");
        d.rewind(Position::new(1, 0));
        d.flow((1, 1), 1);
        assert_eq!(d.next(&src, now).unwrap().position, Position::new(1, 0));
    }
}
