//! A topic's producers and their access modes (Pulsar's PIP-68): `Shared`
//! (any number, none while an exclusive one holds the topic), `Exclusive`
//! (the only one, refused if any other is there), `WaitForExclusive`
//! (queued until it can be the only one) and `ExclusiveWithFencing` (closes
//! the others and takes the topic). An exclusive producer is bound to the
//! topic epoch, which grows with each new exclusive holder and is kept in
//! the topic's record: a producer coming back with an older epoch is fenced.
//!
//! `decide` is the pure rule; `Producers` is the table behind the topic's
//! lock, with the queue of waiters.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use magnetar_proto::pulsar::ServerError;
use tokio::sync::oneshot;

use crate::subscription::ClientLink;

/// (connection id, producer id).
pub type ProducerKey = (u64, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    Shared,
    Exclusive,
    WaitForExclusive,
    ExclusiveWithFencing,
}

impl AccessMode {
    /// The wire value (`ProducerAccessMode`); unknown values are refused.
    pub fn from_wire(v: Option<i32>) -> Option<AccessMode> {
        match v.unwrap_or(0) {
            0 => Some(AccessMode::Shared),
            1 => Some(AccessMode::Exclusive),
            2 => Some(AccessMode::WaitForExclusive),
            3 => Some(AccessMode::ExclusiveWithFencing),
            _ => None,
        }
    }

    pub fn is_exclusive(self) -> bool {
        self != AccessMode::Shared
    }
}

/// What to do with a producer that asks to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Now,
    /// Queue it until the topic has no producer (WaitForExclusive).
    Wait,
    /// Close these producers first (ExclusiveWithFencing), then admit.
    FenceOthers,
    Refuse(ServerError, String),
}

/// The rule. `others` is how many producers the topic has (not counting
/// the asking one), `exclusive_held` whether one of them is exclusive,
/// `waiting` how many WaitForExclusive producers are queued.
pub fn decide(mode: AccessMode, others: usize, exclusive_held: bool, waiting: usize) -> Admit {
    match mode {
        AccessMode::Shared if exclusive_held => Admit::Refuse(
            ServerError::ProducerBusy,
            "the topic has an exclusive producer".into(),
        ),
        // Producers queued for exclusive access go first.
        AccessMode::Shared if waiting > 0 => Admit::Refuse(
            ServerError::ProducerBusy,
            "a producer is waiting for exclusive access to the topic".into(),
        ),
        AccessMode::Shared => Admit::Now,
        _ if others == 0 => Admit::Now,
        AccessMode::Exclusive => Admit::Refuse(
            ServerError::ProducerBusy,
            format!("exclusive access refused: the topic has {others} other producers"),
        ),
        AccessMode::WaitForExclusive => Admit::Wait,
        AccessMode::ExclusiveWithFencing => Admit::FenceOthers,
    }
}

/// The epoch an exclusive producer gets: its own when it comes back with
/// the current one, a new one otherwise; fenced when it comes back with an
/// older one.
pub fn epoch_for(asked: Option<u64>, current: u64) -> Result<(u64, bool), String> {
    match asked {
        Some(e) if e == current && current > 0 => Ok((current, false)),
        Some(e) if e < current => Err(format!(
            "producer fenced: its topic epoch {e} is older than the topic's {current}"
        )),
        _ => Ok((current + 1, true)),
    }
}

pub struct ProducerRef {
    pub name: String,
    pub link: Arc<dyn ClientLink>,
    pub mode: AccessMode,
}

/// The table behind the topic's producers lock.
#[derive(Default)]
pub struct Producers {
    pub map: HashMap<ProducerKey, ProducerRef>,
    exclusive: Option<ProducerKey>,
    waiting: VecDeque<oneshot::Sender<()>>,
}

impl Producers {
    pub fn decide(&mut self, mode: AccessMode) -> Admit {
        self.waiting.retain(|w| !w.is_closed());
        decide(
            mode,
            self.map.len(),
            self.exclusive.is_some(),
            self.waiting.len(),
        )
    }

    /// A waiter, woken when the topic has no producer left.
    pub fn wait(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting.push_back(tx);
        rx
    }

    pub fn insert(&mut self, key: ProducerKey, p: ProducerRef) {
        if p.mode.is_exclusive() {
            self.exclusive = Some(key);
        }
        self.map.insert(key, p);
    }

    /// Removes a producer; the first waiter is woken once none is left.
    pub fn remove(&mut self, key: &ProducerKey) -> Option<ProducerRef> {
        let p = self.map.remove(key);
        if self.exclusive == Some(*key) {
            self.exclusive = None;
        }
        self.wake();
        p
    }

    /// Takes every producer out (fencing, termination, unload).
    pub fn drain(&mut self) -> Vec<(ProducerKey, ProducerRef)> {
        self.exclusive = None;
        self.map.drain().collect()
    }

    /// Drops the waiters (the topic closes: they fail and retry elsewhere).
    pub fn drop_waiters(&mut self) {
        self.waiting.clear();
    }

    fn wake(&mut self) {
        if !self.map.is_empty() {
            return;
        }
        while let Some(w) = self.waiting.pop_front() {
            if w.send(()).is_ok() {
                return;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessMode::*;

    #[test]
    fn shared_producers_share_until_one_is_exclusive() {
        assert_eq!(decide(Shared, 3, false, 0), Admit::Now);
        assert!(matches!(
            decide(Shared, 1, true, 0),
            Admit::Refuse(ServerError::ProducerBusy, _)
        ));
        assert!(matches!(
            decide(Shared, 0, false, 1),
            Admit::Refuse(ServerError::ProducerBusy, _)
        ));
    }

    #[test]
    fn exclusive_modes_need_the_topic_to_themselves() {
        for m in [Exclusive, WaitForExclusive, ExclusiveWithFencing] {
            assert_eq!(decide(m, 0, false, 0), Admit::Now, "{m:?}");
        }
        assert!(matches!(
            decide(Exclusive, 1, false, 0),
            Admit::Refuse(ServerError::ProducerBusy, _)
        ));
        assert_eq!(decide(WaitForExclusive, 2, false, 0), Admit::Wait);
        assert_eq!(decide(ExclusiveWithFencing, 2, true, 0), Admit::FenceOthers);
    }

    #[test]
    fn epochs_grow_with_each_holder_and_fence_older_ones() {
        assert_eq!(epoch_for(None, 0), Ok((1, true)));
        assert_eq!(epoch_for(None, 4), Ok((5, true)), "a new holder");
        assert_eq!(epoch_for(Some(4), 4), Ok((4, false)), "the holder is back");
        assert!(epoch_for(Some(3), 4).is_err(), "an older holder is fenced");
        assert_eq!(epoch_for(Some(9), 4), Ok((5, true)));
    }

    #[test]
    fn the_first_waiter_is_woken_when_the_last_producer_leaves() {
        struct Nobody;
        impl ClientLink for Nobody {
            fn close_producer(&self, _: u64, _: &magnetar_proto::commands::Assigned) {}
            fn close_consumer(&self, _: u64, _: &magnetar_proto::commands::Assigned) {}
        }
        let mut t = Producers::default();
        let p = |mode| ProducerRef {
            name: "p".into(),
            link: Arc::new(Nobody),
            mode,
        };
        t.insert((1, 1), p(Shared));
        t.insert((1, 2), p(Shared));
        assert_eq!(t.decide(WaitForExclusive), Admit::Wait);
        let mut first = t.wait();
        let mut second = t.wait();
        t.remove(&(1, 1));
        assert!(first.try_recv().is_err(), "one producer is left");
        t.remove(&(1, 2));
        assert_eq!(first.try_recv(), Ok(()));
        assert!(second.try_recv().is_err(), "one at a time");
        t.insert((2, 1), p(WaitForExclusive));
        assert!(matches!(t.decide(Shared), Admit::Refuse(..)));
        t.remove(&(2, 1));
        assert_eq!(second.try_recv(), Ok(()));
    }
}
