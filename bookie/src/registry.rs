//! The storage tier's registry: what a bookie advertises, and every key the
//! tier keeps in the metadata service, in one place.
//!
//! - `/bookies/available/<addr>` — a bookie's [`BookieInfo`], ephemeral (bound
//!   to its registration lease); its `writable` flag follows the disk
//!   watermarks.
//! - `/ledgers/<id, 20 digits>` — a ledger's metadata (JSON), changed by CAS
//!   on its version.
//! - `/ledger-ids/next` — written unconditionally; its revision is the next
//!   ledger id.
//! - `/auditor/leader` — the elected auditor's bookie, ephemeral.
//! - `/bookies/cookies/<addr>` — the identity of the bookie at an address
//!   (`identity.rs`), persistent until it is decommissioned.
//! - `/bookies/decommissioning/<addr>` — bookies being decommissioned.

use serde::{Deserialize, Serialize};

/// Where bookies register; the key is `BOOKIES_PREFIX + <address>`.
pub const BOOKIES_PREFIX: &str = "/bookies/available/";

/// What a bookie registers under [`BOOKIES_PREFIX`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BookieInfo {
    pub addr: String,
    pub rack: Option<String>,
    pub writable: bool,
}

/// Ledger metadata records live under this prefix.
pub const LEDGERS_PREFIX: &str = "/ledgers/";

/// Written unconditionally to make a ledger id (its revision).
pub const LEDGER_ID_KEY: &str = "/ledger-ids/next";

/// Where ledger `id`'s metadata is stored.
pub fn ledger_key(id: u64) -> String {
    format!("{LEDGERS_PREFIX}{id:020}")
}

/// The key the elected auditor holds.
pub const AUDITOR_KEY: &str = "/auditor/leader";
