//! A consumer's flow control and batch acknowledgement without I/O:
//! permits are granted in halves of the receiver queue as the application
//! takes messages; the messages of a batch are acknowledged to the broker
//! together, once the last of them is; a reconnect starts both over.

use std::collections::HashMap;

#[derive(Debug)]
pub struct ConsumerState {
    receiver_queue: u32,
    /// Messages handed to the application since permits were last granted.
    taken: u32,
    /// Batched entries with messages not yet acknowledged: (ledger, entry) -> left.
    batches: HashMap<(u64, u64), u32>,
}

impl ConsumerState {
    pub fn new(receiver_queue: u32) -> ConsumerState {
        ConsumerState {
            receiver_queue: receiver_queue.max(2),
            taken: 0,
            batches: HashMap::new(),
        }
    }

    /// Permits to grant on (re)subscribing: a full queue. Whatever was
    /// tracked belongs to the old subscription (its messages come again).
    pub fn subscribed(&mut self) -> u32 {
        self.taken = 0;
        self.batches.clear();
        self.receiver_queue
    }

    /// The application took a message; the permits to grant now, if any.
    pub fn taken(&mut self) -> Option<u32> {
        self.taken += 1;
        if self.taken >= self.receiver_queue / 2 {
            Some(std::mem::take(&mut self.taken))
        } else {
            None
        }
    }

    /// A batch of `n` messages arrived for entry (ledger, entry).
    pub fn batch_arrived(&mut self, entry: (u64, u64), n: u32) {
        self.batches.insert(entry, n);
    }

    /// One message of a batched entry is acknowledged: whether the entry
    /// is now wholly acknowledged (send the ack).
    pub fn ack_in_batch(&mut self, entry: (u64, u64)) -> bool {
        match self.batches.get_mut(&entry) {
            Some(left) if *left > 1 => {
                *left -= 1;
                false
            }
            _ => {
                self.batches.remove(&entry);
                true
            }
        }
    }

    /// Everything up to and including `entry` is acknowledged.
    pub fn acked_through(&mut self, entry: (u64, u64)) {
        self.batches.retain(|e, _| *e > entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_go_out_in_halves_of_the_queue() {
        let mut s = ConsumerState::new(10);
        assert_eq!(s.subscribed(), 10);
        let grants: Vec<Option<u32>> = (0..10).map(|_| s.taken()).collect();
        assert_eq!(
            grants.iter().flatten().copied().collect::<Vec<_>>(),
            vec![5, 5]
        );
        s.taken();
        assert_eq!(s.subscribed(), 10, "a reconnect grants a full queue again");
        assert_eq!(s.taken(), None, "and counts from zero");
    }

    #[test]
    fn a_batch_is_acked_when_its_last_message_is() {
        let mut s = ConsumerState::new(10);
        s.batch_arrived((1, 5), 3);
        assert!(!s.ack_in_batch((1, 5)));
        assert!(!s.ack_in_batch((1, 5)));
        assert!(s.ack_in_batch((1, 5)));
        s.batch_arrived((1, 6), 2);
        s.batch_arrived((1, 7), 2);
        s.acked_through((1, 6));
        assert!(s.ack_in_batch((1, 6)), "forgotten: acked cumulatively");
        assert!(!s.ack_in_batch((1, 7)));
        s.batch_arrived((1, 8), 2);
        s.subscribed();
        assert!(
            s.ack_in_batch((1, 8)),
            "a reconnect forgets partial batches"
        );
    }
}
