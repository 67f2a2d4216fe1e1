//! Durable cursors: each cursor's state is an entry of its own cursor
//! ledger; the managed ledger's record holds only which ledger is current,
//! and changes only when that ledger rolls.

use std::collections::HashMap;

use bytes::Bytes;
use magnetar_bookie::LedgerError;

use super::cursor::CursorState;
use super::ledger_list::CursorPointer;
use super::store::Handle;
use super::{lock, ManagedLedger, MlError};

pub struct CursorLedger {
    writer: Option<Handle>,
    entries: u64,
}

impl ManagedLedger {
    /// Names and positions of the durable cursors, restored from their ledgers.
    pub async fn open_cursors(&self) -> Result<Vec<(String, CursorState)>, MlError> {
        let pointers = self.write.lock().await.info.cursors.clone();
        let mut out = Vec::new();
        for (name, ptr) in pointers {
            let mut state = CursorState::new(ptr.mark_delete);
            if let Some(id) = ptr.cursor_ledger {
                match self.store.recover(id).await {
                    Ok(meta) if meta.last_entry_id >= 0 => {
                        let data = self.store.read(&meta, meta.last_entry_id as u64).await?;
                        state = CursorState::decode(&data)
                            .map_err(|e| MlError::Corrupt(format!("{}/{name}", self.name), e))?;
                    }
                    Ok(_) => {}
                    Err(LedgerError::NoSuchLedger(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            lock(&self.mark_deletes).insert(name.clone(), state.mark_delete);
            out.push((name, state));
        }
        Ok(out)
    }

    /// Persists a cursor's state as an entry of its cursor ledger, rolling
    /// that ledger (and touching metadata) only every so many entries.
    pub async fn persist_cursor(&self, name: &str, state: &CursorState) -> Result<(), MlError> {
        let data = Bytes::from(state.encode());
        let mut cls = self.cursor_ledgers.lock().await;
        let res = self.persist_cursor_inner(&mut cls, name, state, data).await;
        if res.is_ok() {
            lock(&self.mark_deletes).insert(name.to_string(), state.mark_delete);
        }
        res
    }

    async fn persist_cursor_inner(
        &self,
        cls: &mut HashMap<String, CursorLedger>,
        name: &str,
        state: &CursorState,
        data: Bytes,
    ) -> Result<(), MlError> {
        self.check_writable()?;
        let cl = cls.entry(name.to_string()).or_insert(CursorLedger {
            writer: None,
            entries: 0,
        });
        let usable = cl.writer.as_ref().is_some_and(|w| !w.is_failed())
            && cl.entries < self.cfg.max_cursor_ledger_entries;
        if usable {
            if let Some(w) = &cl.writer {
                if w.add(data.clone()).await.is_ok() {
                    cl.entries += 1;
                    return Ok(());
                }
            }
        }
        // New cursor ledger: write the state first, then point metadata at it.
        let writer = self
            .create_ledger("cursor", format!("{}/{name}", self.name))
            .await?;
        writer.add(data).await?;
        let old = {
            let mut w = self.write.lock().await;
            let old = w.info.cursors.get(name).and_then(|p| p.cursor_ledger);
            let previous = w.info.cursors.insert(
                name.to_string(),
                CursorPointer {
                    cursor_ledger: Some(writer.ledger_id()),
                    mark_delete: state.mark_delete,
                },
            );
            if let Err(e) = self.store_info(&mut w).await {
                match previous {
                    Some(p) => w.info.cursors.insert(name.to_string(), p),
                    None => w.info.cursors.remove(name),
                };
                return Err(e);
            }
            old
        };
        if let Some(old_writer) = cl.writer.take() {
            let _ = old_writer.close().await;
        }
        if let Some(id) = old {
            let _ = self.store.delete(id).await;
        }
        cl.writer = Some(writer);
        cl.entries = 1;
        Ok(())
    }

    pub async fn delete_cursor(&self, name: &str) -> Result<(), MlError> {
        lock(&self.mark_deletes).remove(name);
        let old = {
            let mut w = self.write.lock().await;
            let Some(previous) = w.info.cursors.remove(name) else {
                return Ok(());
            };
            if let Err(e) = self.store_info(&mut w).await {
                w.info.cursors.insert(name.to_string(), previous);
                return Err(e);
            }
            previous.cursor_ledger
        };
        if let Some(cl) = self.cursor_ledgers.lock().await.remove(name) {
            if let Some(w) = cl.writer {
                let _ = w.close().await;
            }
        }
        if let Some(id) = old {
            let _ = self.store.delete(id).await;
        }
        Ok(())
    }

    /// Closes every cursor ledger this broker writes (unload, shutdown): the
    /// next owner reads their last entries without recovering them.
    pub async fn close_cursor_ledgers(&self) {
        let mut cls = self.cursor_ledgers.lock().await;
        for (_, cl) in cls.drain() {
            if let Some(w) = cl.writer {
                let _ = w.close().await;
            }
        }
    }
}
