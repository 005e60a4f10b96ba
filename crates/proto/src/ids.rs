use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string or byte string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// A handle that breaks the handle rules.
    #[error("invalid handle {0:?}: use 3 to 32 characters a-z, 0-9, '_', '-' or '.', starting with a letter")]
    Handle(String),
    /// Not the expected number of hex digits.
    #[error("invalid {kind}: expected {digits} hex digits")]
    Hex {
        /// Which id.
        kind: &'static str,
        /// How many hex digits it takes.
        digits: usize,
    },
    /// A device address not of the form `handle/device`.
    #[error("invalid device address {0:?}: expected HANDLE/DEVICE")]
    Address(String),
}

/// A user's handle: the only name an account has (no phone, no email).
///
/// Handles are case-insensitive and stored lower-case: 3 to 32 characters of
/// `a-z 0-9 _ - .`, starting with a letter.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

impl Handle {
    /// Validates and normalises a handle.
    ///
    /// # Errors
    /// [`IdError::Handle`] when the text breaks the handle rules.
    pub fn new(s: &str) -> Result<Self, IdError> {
        let lower = s.trim().to_ascii_lowercase();
        let ok_len = (3..=32).contains(&lower.len());
        let ok_first = lower.chars().next().is_some_and(|c| c.is_ascii_lowercase());
        let ok_chars =
            lower.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
        if ok_len && ok_first && ok_chars {
            Ok(Handle(lower))
        } else {
            Err(IdError::Handle(s.chars().take(64).collect()))
        }
    }
    /// The handle text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({})", self.0)
    }
}
impl FromStr for Handle {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Handle::new(s)
    }
}
impl Serialize for Handle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for Handle {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Handle::new(&s).map_err(serde::de::Error::custom)
    }
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $n:expr, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $n]);

        impl $name {
            /// Builds the id from its bytes.
            ///
            /// # Errors
            /// [`IdError::Hex`] when the slice has the wrong length.
            pub fn from_slice(b: &[u8]) -> Result<Self, IdError> {
                <[u8; $n]>::try_from(b)
                    .map($name)
                    .map_err(|_| IdError::Hex { kind: $kind, digits: $n * 2 })
            }
            /// The id's bytes.
            pub fn as_bytes(&self) -> &[u8; $n] {
                &self.0
            }
            /// Lower-case hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let bytes = hex::decode(s).map_err(|_| IdError::Hex { kind: $kind, digits: $n * 2 })?;
                $name::from_slice(&bytes)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// A device of an account: 8 random bytes, shown as 16 hex digits.
    DeviceId, 8, "device id"
);
hex_id!(
    /// A conversation (an MLS group id): 16 random bytes. Opaque to the server.
    ConversationId, 16, "conversation id"
);
hex_id!(
    /// A message's end-to-end id, chosen by the sender inside the encryption.
    MessageId, 16, "message id"
);
hex_id!(
    /// A link slot for provisioning a new device: 6 random bytes.
    LinkId, 6, "link id"
);
hex_id!(
    /// An attachment blob on the server: 16 random bytes the server picks.
    /// Opaque: the server never learns what the blob holds.
    BlobId, 16, "blob id"
);
hex_id!(
    /// The sender's idempotency key for one send request: a retry with the same
    /// key is stored once.
    SendId, 16, "send id"
);

/// An MLS epoch as the server orders it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// One device of one account: where the server delivers.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceAddress {
    /// The account.
    pub handle: Handle,
    /// The device.
    pub device: DeviceId,
}

impl fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.handle, self.device)
    }
}
impl fmt::Debug for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceAddress({self})")
    }
}
impl FromStr for DeviceAddress {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let (h, d) = s.split_once('/').ok_or_else(|| IdError::Address(s.chars().take(80).collect()))?;
        Ok(DeviceAddress { handle: Handle::new(h)?, device: d.parse()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_validated_and_lowercased() {
        assert_eq!(Handle::new("Alice").map(|h| h.0), Ok("alice".into()));
        for bad in ["", "ab", "1abc", "a b", "alice!", "ä_user", &"a".repeat(33)] {
            assert!(Handle::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hex_ids_round_trip_and_reject_bad_lengths() {
        let id = ConversationId([7; 16]);
        let s = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(serde_json::from_str::<ConversationId>(&s).ok(), Some(id));
        assert!("abcd".parse::<ConversationId>().is_err());
        assert!("zz".repeat(16).parse::<ConversationId>().is_err());
        let addr: DeviceAddress = "bob/0011223344556677".parse().expect("valid address");
        assert_eq!(addr.to_string(), "bob/0011223344556677");
    }
}
