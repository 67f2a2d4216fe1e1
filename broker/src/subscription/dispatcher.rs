//! The `Dispatcher` trait: the I/O-free core of a subscription type. It is
//! told what happens (consumers come and go, grant permits, acknowledge,
//! ask for redelivery; the time) and answers which entry goes to which
//! consumer next. The subscription task does the reading and the sending.

use std::time::Instant;

use magnetar_proto::pulsar::command_subscribe::SubType;

use super::redelivery::Unacked;
use crate::managed_ledger::cursor::Position;
use crate::BrokerError;

/// A consumer within a subscription: (connection id, consumer id).
pub type ConsumerKey = (u64, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub key: ConsumerKey,
    pub name: String,
    pub priority: i32,
    /// What a Key_Shared consumer asks for (ignored by the other types).
    pub key_shared: KeySharedSpec,
}

/// How a Key_Shared consumer gets its hash slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KeySharedSpec {
    /// Ranges split automatically as consumers come and go.
    #[default]
    AutoSplit,
    /// Exactly these slot ranges (inclusive), overlapping no other consumer's.
    Sticky(Vec<(u16, u16)>),
}

/// What the dispatcher may see of the topic and the cursor.
pub trait EntrySource {
    /// The first confirmed entry at or after `p`, if any.
    fn at_or_after(&self, p: Position) -> Option<Position>;
    /// Whether the cursor has `p` acknowledged.
    fn is_acked(&self, p: Position) -> bool;
}

/// Send the entry at `position` to `consumer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerKey,
    pub position: Position,
    pub redelivery_count: u32,
}

pub trait Dispatcher: Send {
    fn sub_type(&self) -> SubType;
    /// Admits a consumer, or refuses it (e.g. a second consumer of an
    /// Exclusive subscription).
    fn add_consumer(&mut self, c: ConsumerInfo, now: Instant) -> Result<(), BrokerError>;
    /// Removes a consumer; what it had unacknowledged goes back for redelivery.
    fn remove_consumer(&mut self, key: ConsumerKey, now: Instant);
    fn consumers(&self) -> Vec<ConsumerKey>;
    /// The one consumer entries go to, for types that have one (Failover).
    fn active_consumer(&self) -> Option<ConsumerKey> {
        None
    }
    /// Entries whose key must be known before the next decision (Key_Shared):
    /// the task reads them and tells their slots through `learn_key`.
    fn wants_keys(&self, _src: &dyn EntrySource) -> Vec<Position> {
        Vec::new()
    }
    /// The key hash slot of the entry at `p`.
    fn learn_key(&mut self, _p: Position, _slot: u16) {}
    /// The consumer asks for `permits` more messages.
    fn flow(&mut self, key: ConsumerKey, permits: u32);
    /// The next entry to send and to whom, if any consumer can take one.
    fn next(&mut self, src: &dyn EntrySource, now: Instant) -> Option<Delivery>;
    /// `d` was sent; it carried `messages` messages (a batch counts each).
    fn sent(&mut self, d: Delivery, messages: u32);
    /// The delivery state every type keeps.
    fn unacked(&mut self) -> &mut Unacked;
    /// The delivery state, to look at (changes nothing).
    fn unacked_ref(&self) -> &Unacked;
    /// The delivery state, to carry over when the subscription changes type.
    fn into_unacked(self: Box<Self>) -> Unacked;

    fn acked(&mut self, p: Position) {
        self.unacked().acked(p);
    }
    /// Everything up to and including `p` is acknowledged.
    fn acked_through(&mut self, p: Position) {
        self.unacked().acked_through(p);
    }
    /// The consumer gives back `positions` (or everything it holds) for redelivery.
    fn redeliver(&mut self, key: ConsumerKey, positions: Option<&[Position]>) {
        match positions {
            Some(ps) => self.unacked().give_back_some(key, ps),
            None => self.unacked().give_back(key),
        }
    }
    /// Starts over from `next_read` (seek); forgets what was in flight.
    fn rewind(&mut self, next_read: Position) {
        self.unacked().rewind(next_read);
    }
    /// `d` could not be sent (read failed, consumer gone): it goes back.
    fn not_sent(&mut self, d: Delivery) {
        self.unacked().not_delivered(d.position);
    }
}
