//! A bookie's identity (BookKeeper's cookie): an instance id kept both in
//! its data dir and in the metadata service under its address.
//!
//! Ledgers name bookies by address. A bookie that comes back at an address
//! with a new, empty disk (a replaced volume, a lost persistent volume, a
//! data dir pointed elsewhere) would answer "no such entry" for entries it
//! was trusted to hold — and recovery counts such answers when it decides
//! where a ledger ends, so acknowledged entries could be cut off. A bookie
//! therefore refuses to start when its data dir and the address disagree
//! about who it is. Decommissioning (`magnetar admin bookie decommission`)
//! copies what the address held elsewhere and then frees it.

use std::path::Path;

use magnetar_metadata::MetadataClient;
use serde::{Deserialize, Serialize};

use crate::server::BookieError;

/// The file in the data dir holding the instance id.
pub const INSTANCE_FILE: &str = "INSTANCE";

/// Where an address's identity lives: `COOKIES_PREFIX + <address>`.
pub const COOKIES_PREFIX: &str = "/bookies/cookies/";

/// Bookies being decommissioned: the auditor copies what they held at once,
/// without waiting for the grace period.
pub const DECOMMISSIONING_PREFIX: &str = "/bookies/decommissioning/";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cookie {
    pub instance: String,
}

/// What the check found (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A new bookie: both records were written.
    New(String),
    /// The data dir had an id the metadata service did not (a cluster from
    /// before identities, or an address decommissioned and reused with its
    /// old disk): the address takes it.
    Claimed(String),
    /// Both agree.
    Known(String),
}

fn new_instance_id() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn read_local(data_dir: &Path) -> Result<Option<String>, BookieError> {
    match std::fs::read_to_string(data_dir.join(INSTANCE_FILE)) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BookieError::Config(format!(
            "reading {}: {e}",
            data_dir.join(INSTANCE_FILE).display()
        ))),
    }
}

/// Writes the id durably (a temporary file, fsync, rename, fsync the dir).
fn write_local(data_dir: &Path, id: &str) -> Result<(), BookieError> {
    use std::io::Write;
    let io = |e: std::io::Error| BookieError::Config(format!("writing the instance file: {e}"));
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let tmp = data_dir.join(format!("{INSTANCE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(id.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, data_dir.join(INSTANCE_FILE)).map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Checks (and on first start records) the identity of the bookie at
/// `addr` with its data in `data_dir`. Called before the bookie answers
/// anything.
pub async fn check(
    metadata: &MetadataClient,
    addr: &str,
    data_dir: &Path,
) -> Result<Identity, BookieError> {
    let key = format!("{COOKIES_PREFIX}{addr}");
    let reg = |e: magnetar_metadata::MetadataError| BookieError::Registration(e.to_string());
    let local = read_local(data_dir)?;
    let remote = match metadata.get(&key).await.map_err(reg)? {
        Some(kv) => Some(
            serde_json::from_slice::<Cookie>(&kv.value)
                .map_err(|e| BookieError::Registration(format!("{key}: {e}")))?
                .instance,
        ),
        None => None,
    };
    let claim = |id: String| async move {
        let value = serde_json::to_vec(&Cookie {
            instance: id.clone(),
        })
        .map_err(|e| BookieError::Registration(e.to_string()))?;
        if metadata.cas(&key, 0, value, None).await.map_err(reg)? {
            Ok(id)
        } else {
            Err(BookieError::Identity(format!(
                "another bookie claimed the address {addr} at the same time"
            )))
        }
    };
    match (local, remote) {
        (Some(l), Some(r)) if l == r => Ok(Identity::Known(l)),
        (Some(l), Some(r)) => Err(BookieError::Identity(format!(
            "the data dir {} belongs to bookie instance {l}, but {addr} is instance {r}: \
             was a data dir moved between bookies? Start each bookie with its own data dir",
            data_dir.display()
        ))),
        (None, Some(r)) => Err(BookieError::Identity(format!(
            "{addr} is bookie instance {r}, which held ledger entries, but the data dir {} \
             is new: that bookie's disk is gone. Its entries are under-replicated until they \
             are copied elsewhere; run `magnetar admin bookie decommission {addr}` (it copies \
             them and frees the address), then start this bookie again",
            data_dir.display()
        ))),
        (Some(l), None) => Ok(Identity::Claimed(claim(l).await?)),
        (None, None) => {
            let id = new_instance_id();
            write_local(data_dir, &id)?;
            Ok(Identity::New(claim(id).await?))
        }
    }
}
