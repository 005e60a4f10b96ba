//! Wire types shared by the Subrosa client and server.
//!
//! Everything here is what crosses the network: validated ids, request and
//! response bodies, the signed-request scheme and the limits both sides
//! enforce. Nothing here knows about MLS: to the server every payload is an
//! opaque byte string.

mod api;
mod auth;
pub mod blob;
mod bytes;
pub mod frames;
pub mod framing;
mod ids;
pub mod kt;
pub mod limits;
pub mod relay;
pub mod welcome_ref;

pub use api::*;
pub use auth::{
    body_digest, canonical_request, SignedHeaders, HEADER_DEVICE, HEADER_HANDLE, HEADER_NONCE, HEADER_SIGNATURE,
    HEADER_TIMESTAMP, MAX_CLOCK_SKEW_MS,
};
pub use bytes::B64;
pub use ids::{BlobId, ConversationId, DeviceAddress, DeviceId, Epoch, Handle, IdError, LinkId, MessageId, SendId};
