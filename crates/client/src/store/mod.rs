//! The client's local store.

mod sqlite;

pub use sqlite::*;
