//! The dangerous-link list on this device, and the preview setting.
//!
//! The list ([`subrosa_core::linklist`]) comes only from a file the user
//! imports: never from the server, never pushed by anyone. It is kept in
//! the encrypted store, checked again (signature and all) whenever it is
//! read, and replaced only by a list of a higher version signed by a
//! trusted key. Checking a link reads nothing but the store.

use subrosa_core::linklist::{LinkList, ListError, RELEASE_KEY};
use subrosa_session::ClientError;

use crate::Subrosa;

/// The store's key for the imported list (the file's bytes, as imported).
const META_LINK_LIST: &str = "link_list";
/// The store's key for the preview setting (`on` or `off`; unset: the
/// configuration file decides).
const META_PREVIEWS: &str = "previews";
/// The environment variable that names one more trusted list key (32 bytes
/// in hex) in a debug build, for tests, whose keys are made at run time.
/// Release builds ignore it.
pub const TEST_KEY_ENV: &str = "SUBROSA_TEST_LINKLIST_KEY";

/// The keys a list must be signed by: the release key and, only in a debug
/// build (`cfg(debug_assertions)`) whose environment names one, a test's
/// key. No key whose secret is in the repository is ever trusted: the
/// release key's secret never was there, and tests make their keys when
/// they run.
pub fn trusted_keys() -> Vec<[u8; 32]> {
    #[allow(unused_mut)]
    let mut keys = vec![RELEASE_KEY];
    #[cfg(debug_assertions)]
    if let Some(k) = std::env::var(TEST_KEY_ENV)
        .ok()
        .and_then(|h| hex::decode(h.trim()).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    {
        keys.push(k);
    }
    keys
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Imported {
    /// The list is now the device's.
    New {
        /// Its version.
        version: u64,
        /// How many prefixes it holds.
        entries: usize,
        /// The version it replaced.
        replaced: Option<u64>,
    },
    /// The same list was imported before: nothing changed.
    Same {
        /// Its version.
        version: u64,
    },
}

fn refused(e: ListError) -> ClientError {
    ClientError::Input(format!("refused: {e}; the list you had is kept"))
}

impl Subrosa {
    /// Imports a list file: verified against [`trusted_keys`], and kept
    /// only when its version is higher than the stored list's (the same
    /// bytes again change nothing). A refused file leaves the stored list
    /// as it was.
    ///
    /// # Errors
    /// [`ClientError::Input`] for a file that is not a list, not signed by
    /// a trusted key, or older than (or as old as, but different from) the
    /// list held; store errors.
    pub fn import_link_list(&self, bytes: &[u8]) -> Result<Imported, ClientError> {
        let list = LinkList::verify(bytes, &trusted_keys()).map_err(refused)?;
        self.store().write(|tx| {
            let held = tx.meta(META_LINK_LIST)?;
            let held_version =
                held.as_deref().and_then(|b| LinkList::verify(b, &trusted_keys()).ok()).map(|l| l.version());
            if let Some(v) = held_version {
                if held.as_deref().map(Vec::as_slice) == Some(bytes) {
                    return Ok(Imported::Same { version: v });
                }
                if list.version() <= v {
                    return Err(ClientError::Input(format!(
                        "refused: this list is version {}, not newer than version {v} that this device holds (kept)",
                        list.version()
                    )));
                }
            }
            tx.set_meta(META_LINK_LIST, bytes)?;
            *self.link_list.lock().unwrap_or_else(|p| p.into_inner()) = None;
            Ok(Imported::New { version: list.version(), entries: list.len(), replaced: held_version })
        })
    }

    /// The device's list, verified again; `None` before any import (or
    /// when the stored one no longer verifies with this build's keys).
    ///
    /// # Errors
    /// Store errors.
    pub fn link_list(&self) -> Result<Option<LinkList>, ClientError> {
        let held = self.store().read(|tx| tx.meta(META_LINK_LIST))?;
        Ok(held.and_then(|b| LinkList::verify(&b, &trusted_keys()).ok()))
    }

    /// The links of `text` on the dangerous-link list (none without a
    /// list). The list is verified once and kept until the next import
    /// through this device.
    ///
    /// # Errors
    /// Store errors.
    pub fn dangerous_links(&self, text: &str) -> Result<Vec<String>, ClientError> {
        let list = {
            let mut cached = self.link_list.lock().unwrap_or_else(|p| p.into_inner());
            match &*cached {
                Some(l) => l.clone(),
                None => {
                    let l = self.link_list()?.map(std::sync::Arc::new);
                    *cached = Some(l.clone());
                    l
                }
            }
        };
        Ok(list.map(|l| l.dangerous_links(text)).unwrap_or_default())
    }

    /// Marks `messages` as every front end shows them (the command line,
    /// the daemon's answers and notifications, the terminal UI): in a
    /// message request, `request` set and the stranger's preview held back
    /// ([`subrosa_session::requests::mark_requests`]); the links on the
    /// dangerous-link list as `dangerous_links`.
    ///
    /// # Errors
    /// Store errors.
    pub fn mark_shown(&self, messages: &mut [crate::StoredMessage]) -> Result<(), ClientError> {
        self.store().read(|tx| subrosa_session::requests::mark_requests(tx, messages))?;
        for m in messages.iter_mut() {
            m.dangerous_links = if m.system || m.deleted { Vec::new() } else { self.dangerous_links(&m.text)? };
        }
        Ok(())
    }

    /// This device's preview setting: `Some(on)` once set with
    /// [`Self::set_previews`], `None` while the configuration file decides.
    ///
    /// # Errors
    /// Store errors.
    pub fn previews(&self) -> Result<Option<bool>, ClientError> {
        Ok(self.store().read(|tx| tx.meta(META_PREVIEWS))?.map(|v| v.as_slice() == b"on"))
    }

    /// Turns link previews of this device's messages on or off.
    ///
    /// # Errors
    /// Store errors.
    pub fn set_previews(&self, on: bool) -> Result<(), ClientError> {
        self.store().write(|tx| tx.set_meta(META_PREVIEWS, if on { b"on" } else { b"off" }))
    }
}
