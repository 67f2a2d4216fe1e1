//! A ledger's metadata: ensemble and quorums, state, and its fragments —
//! the bookies (and stripe width) of each range of entries.

use std::collections::BTreeMap;

use magnetar_proto::ledger::MasterKey;
use serde::{Deserialize, Serialize};

use super::write_state::write_set;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerState {
    Open,
    InRecovery,
    Closed,
}

/// Entries from `first_entry` on are stored on `bookies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    pub first_entry: u64,
    pub bookies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerMetadata {
    pub ledger_id: u64,
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    pub fragments: Vec<Fragment>,
    pub state: LedgerState,
    /// Last entry of a closed ledger (-1: empty).
    pub last_entry_id: i64,
    pub length_bytes: u64,
    pub master_key: MasterKey,
    pub created_ms: u64,
    pub properties: BTreeMap<String, String>,
}

impl LedgerMetadata {
    pub fn fragment_for(&self, entry_id: u64) -> Option<&Fragment> {
        self.fragments
            .iter()
            .rev()
            .find(|f| f.first_entry <= entry_id)
    }

    /// Entries from `first_entry` on go to `bookies`: a new fragment, or the
    /// last one rewritten when it starts there too (nothing written to it yet).
    pub fn start_fragment(&mut self, first_entry: u64, bookies: Vec<String>) {
        match self.fragments.last_mut() {
            Some(f) if f.first_entry == first_entry => f.bookies = bookies,
            _ => self.fragments.push(Fragment {
                first_entry,
                bookies,
            }),
        }
    }

    /// How many bookies the entries of `entry_id`'s fragment are striped
    /// over: its bookie count. That is the ledger's ensemble size, except
    /// in a fragment a writer shrank because no spare bookie was left.
    pub fn width_at(&self, entry_id: u64) -> usize {
        self.fragment_for(entry_id)
            .map(|f| f.bookies.len())
            .unwrap_or(self.ensemble_size)
            .max(1)
    }

    /// Bookies holding `entry_id`, in write-set order.
    pub fn bookies_for(&self, entry_id: u64) -> Vec<String> {
        match self.fragment_for(entry_id) {
            Some(f) => write_set(
                f.bookies.len().max(1),
                self.write_quorum.min(f.bookies.len().max(1)),
                entry_id,
            )
            .map(|i| f.bookies[i].clone())
            .collect(),
            None => Vec::new(),
        }
    }
}
