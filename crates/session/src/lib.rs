//! The Subrosa client session, without I/O.
//!
//! Everything a device decides lives here, over the [`store`] trait: what
//! an incoming envelope means (Welcomes, commits, messages), which keys are
//! pinned and which are refused, gaps, replays and reorders, the key
//! directory's chain of roots, gossiped heads and forks ([`directory`]),
//! and what is stored and shown. It holds no socket, file or clock of its own: callers
//! hand it envelopes, the time (a [`Clock`]) and a store, and get back
//! typed [`SessionEvent`]s and the work to do next; randomness comes from
//! the MLS crypto provider it is built with. The native clients
//! (`subrosa-client`) run it over SQLCipher and the network; it builds for
//! `wasm32-unknown-unknown` with the pure-Rust provider (`--features
//! browser`), for the web client.

mod calls;
mod error;
pub mod store;

pub use error::ClientError;
mod annotations;
mod attachments;
mod commits;
pub mod directory;
mod members;
pub mod moves;
mod outbox;
pub mod requests;
pub mod rotation;
mod session;
mod system;

pub use annotations::META_READ_RECEIPTS;
pub use calls::{CallLine, IncomingSignal};
pub use members::DirectoryAnswer;
pub use outbox::{Outgoing, Prepared};
pub use session::*;
pub use system::{format_duration, Advice, SystemEvent};

#[cfg(test)]
mod tests;
