//! A text with a link preview (content kind 9): what the sender's own
//! device found at the first link of its text (title, description, at most
//! one small thumbnail), sent inside the encryption. Recipients show it as
//! the sender's claim; they never fetch the link, and the server cannot.
//!
//! Payload version 1: `0x01 || MLS-encoded {text, url, title, description,
//! thumbnail type (u8: 0 none, 1 PNG, 2 JPEG, 3 GIF, 4 WebP), thumbnail}`,
//! decoded canonically: every field in its limits, the URL one that the
//! text carries, a thumbnail exactly when its type is not 0 and whose bytes
//! start as that type's do, nothing left over.

use mls_rs_codec::{MlsDecode, MlsEncode, MlsSize};

use crate::CoreError;

/// Payload version 1.
pub const PREVIEW_V1: u8 = 1;
/// Longest URL a preview names, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest title, in bytes of UTF-8.
pub const MAX_TITLE_BYTES: usize = 300;
/// Longest description, in bytes of UTF-8.
pub const MAX_DESCRIPTION_BYTES: usize = 1000;
/// Largest thumbnail, in bytes.
pub const MAX_THUMBNAIL_BYTES: usize = 32 * 1024;

/// The image formats a thumbnail may have, each recognised by its first
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageKind {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// GIF.
    Gif,
    /// WebP.
    Webp,
}

impl ImageKind {
    /// The format `bytes` start as, if one of these.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageKind::Png)
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(ImageKind::Jpeg)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageKind::Gif)
        } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(ImageKind::Webp)
        } else {
            None
        }
    }

    /// Its media type.
    pub fn media_type(self) -> &'static str {
        match self {
            ImageKind::Png => "image/png",
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Gif => "image/gif",
            ImageKind::Webp => "image/webp",
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            ImageKind::Png => 1,
            ImageKind::Jpeg => 2,
            ImageKind::Gif => 3,
            ImageKind::Webp => 4,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(ImageKind::Png),
            2 => Some(ImageKind::Jpeg),
            3 => Some(ImageKind::Gif),
            4 => Some(ImageKind::Webp),
            _ => None,
        }
    }
}

/// A small image of the page, as the sender's device fetched it.
#[derive(Clone, PartialEq, Eq)]
pub struct Thumbnail {
    /// Its format (its bytes start as this format's do).
    pub kind: ImageKind,
    /// The image, at most [`MAX_THUMBNAIL_BYTES`].
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Thumbnail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Thumbnail({:?}, <{} bytes>)", self.kind, self.bytes.len())
    }
}

/// What the sender's device found at a link (untrusted on the receiving
/// side: it is the sender's word, to be made safe before it is shown).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct LinkPreview {
    /// The link, as the text carries it.
    pub url: String,
    /// The page's title (may be empty).
    pub title: String,
    /// The page's description (may be empty).
    pub description: String,
    /// At most one small image.
    pub thumbnail: Option<Thumbnail>,
}

impl std::fmt::Debug for LinkPreview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Links and titles are content: never in logs.
        f.debug_struct("LinkPreview")
            .field("url", &format_args!("<{} bytes>", self.url.len()))
            .field("thumbnail", &self.thumbnail)
            .finish_non_exhaustive()
    }
}

#[derive(MlsSize, MlsEncode, MlsDecode)]
struct PreviewV1 {
    text: Vec<u8>,
    url: Vec<u8>,
    title: Vec<u8>,
    description: Vec<u8>,
    thumbnail_kind: u8,
    thumbnail: Vec<u8>,
}

/// The preview's own fields (without the text): how a store keeps it.
#[derive(MlsSize, MlsEncode, MlsDecode)]
struct StoredV1 {
    url: Vec<u8>,
    title: Vec<u8>,
    description: Vec<u8>,
    thumbnail_kind: u8,
    thumbnail: Vec<u8>,
}

impl LinkPreview {
    /// Checks the limits, and that `text` carries the URL.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] naming the first field out of its limits.
    pub fn check(&self, text: &str) -> Result<(), CoreError> {
        let url = &self.url;
        if url.is_empty() || url.len() > MAX_URL_BYTES || !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CoreError::Malformed("preview: URL"));
        }
        let lower = url.get(..8).unwrap_or_default().to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) {
            return Err(CoreError::Malformed("preview: URL is not http(s)"));
        }
        if !text.contains(url.as_str()) {
            return Err(CoreError::Malformed("preview: URL not in the text"));
        }
        if self.title.len() > MAX_TITLE_BYTES {
            return Err(CoreError::Malformed("preview: title too long"));
        }
        if self.description.len() > MAX_DESCRIPTION_BYTES {
            return Err(CoreError::Malformed("preview: description too long"));
        }
        if let Some(t) = &self.thumbnail {
            if t.bytes.len() > MAX_THUMBNAIL_BYTES || ImageKind::sniff(&t.bytes) != Some(t.kind) {
                return Err(CoreError::Malformed("preview: thumbnail"));
            }
        }
        Ok(())
    }

    fn thumbnail_wire(&self) -> (u8, Vec<u8>) {
        match &self.thumbnail {
            Some(t) => (t.kind.to_wire(), t.bytes.clone()),
            None => (0, Vec::new()),
        }
    }

    fn from_wire(
        url: Vec<u8>,
        title: Vec<u8>,
        description: Vec<u8>,
        kind: u8,
        thumbnail: Vec<u8>,
    ) -> Result<Self, CoreError> {
        let bad = || CoreError::Malformed("preview payload");
        let thumbnail = match (kind, thumbnail.is_empty()) {
            (0, true) => None,
            (0, false) | (_, true) => return Err(bad()),
            (k, false) => Some(Thumbnail { kind: ImageKind::from_wire(k).ok_or_else(bad)?, bytes: thumbnail }),
        };
        Ok(LinkPreview {
            url: String::from_utf8(url).map_err(|_| bad())?,
            title: String::from_utf8(title).map_err(|_| bad())?,
            description: String::from_utf8(description).map_err(|_| bad())?,
            thumbnail,
        })
    }

    /// The payload of a text with this preview, its version byte first.
    ///
    /// # Errors
    /// [`CoreError::Malformed`] for a text over
    /// [`crate::content::MAX_TEXT_BYTES`] or a preview out of its limits
    /// (see [`Self::check`]).
    pub fn encode_payload(&self, text: &str) -> Result<Vec<u8>, CoreError> {
        if text.len() > crate::content::MAX_TEXT_BYTES {
            return Err(CoreError::Malformed("preview: text over 64 KiB"));
        }
        self.check(text)?;
        let (thumbnail_kind, thumbnail) = self.thumbnail_wire();
        let wire = PreviewV1 {
            text: text.as_bytes().to_vec(),
            url: self.url.as_bytes().to_vec(),
            title: self.title.as_bytes().to_vec(),
            description: self.description.as_bytes().to_vec(),
            thumbnail_kind,
            thumbnail,
        };
        let mut out = vec![PREVIEW_V1];
        wire.mls_encode(&mut out).map_err(|_| CoreError::Bug("preview encoding"))?;
        Ok(out)
    }

    /// Decodes a payload with its version byte: the text and its preview,
    /// or `Ok(None)` for a version this build does not read.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn decode_payload(payload: &[u8]) -> Result<Option<(String, Self)>, CoreError> {
        let mut rest = match payload.split_first() {
            Some((&PREVIEW_V1, rest)) => rest,
            Some(_) => return Ok(None),
            None => return Err(CoreError::Malformed("preview: empty payload")),
        };
        let w = PreviewV1::mls_decode(&mut rest).map_err(|_| CoreError::Malformed("preview payload"))?;
        if !rest.is_empty() {
            return Err(CoreError::Malformed("preview payload"));
        }
        if w.text.len() > crate::content::MAX_TEXT_BYTES {
            return Err(CoreError::Malformed("preview: text over 64 KiB"));
        }
        let text = String::from_utf8(w.text).map_err(|_| CoreError::Malformed("preview: text is not UTF-8"))?;
        let preview = Self::from_wire(w.url, w.title, w.description, w.thumbnail_kind, w.thumbnail)?;
        preview.check(&text)?;
        Ok(Some((text, preview)))
    }

    /// The preview alone, as a store keeps it beside its message's text:
    /// `0x01 || MLS-encoded {url, title, description, thumbnail type,
    /// thumbnail}`.
    ///
    /// # Errors
    /// [`CoreError::Bug`] if the encoder fails.
    pub fn to_stored(&self) -> Result<Vec<u8>, CoreError> {
        let (thumbnail_kind, thumbnail) = self.thumbnail_wire();
        let wire = StoredV1 {
            url: self.url.as_bytes().to_vec(),
            title: self.title.as_bytes().to_vec(),
            description: self.description.as_bytes().to_vec(),
            thumbnail_kind,
            thumbnail,
        };
        let mut out = vec![PREVIEW_V1];
        wire.mls_encode(&mut out).map_err(|_| CoreError::Bug("preview encoding"))?;
        Ok(out)
    }

    /// Reads what [`Self::to_stored`] wrote.
    ///
    /// # Errors
    /// [`CoreError::Malformed`].
    pub fn from_stored(bytes: &[u8]) -> Result<Self, CoreError> {
        let bad = || CoreError::Malformed("stored preview");
        let mut rest = match bytes.split_first() {
            Some((&PREVIEW_V1, rest)) => rest,
            _ => return Err(bad()),
        };
        let w = StoredV1::mls_decode(&mut rest).map_err(|_| bad())?;
        if !rest.is_empty() {
            return Err(bad());
        }
        Self::from_wire(w.url, w.title, w.description, w.thumbnail_kind, w.thumbnail)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    fn preview() -> LinkPreview {
        LinkPreview {
            url: "https://a.example/x".into(),
            title: "secret title".into(),
            description: "D".into(),
            thumbnail: Some(Thumbnail { kind: ImageKind::Gif, bytes: b"GIF89a".to_vec() }),
        }
    }

    #[test]
    fn round_trips_and_stores() {
        let p = preview();
        let text = "see https://a.example/x now";
        let payload = p.encode_payload(text).expect("encodes");
        assert_eq!(LinkPreview::decode_payload(&payload).expect("decodes"), Some((text.to_string(), p.clone())));
        assert_eq!(LinkPreview::from_stored(&p.to_stored().expect("stores")).expect("reads"), p);
        let none = LinkPreview { thumbnail: None, ..p };
        assert_eq!(LinkPreview::from_stored(&none.to_stored().expect("stores")).expect("reads"), none);
    }

    /// The form the client store keeps (`messages.preview`), byte for byte.
    #[test]
    fn snapshot_of_the_stored_form() {
        let p = LinkPreview {
            url: "https://a.b".into(),
            title: "T".into(),
            description: "D".into(),
            thumbnail: Some(Thumbnail { kind: ImageKind::Gif, bytes: b"GIF89a".to_vec() }),
        };
        let expected = concat!(
            "01",                       // version 1
            "0b68747470733a2f2f612e62", // URL
            "0154",                     // title
            "0144",                     // description
            "03",                       // thumbnail type: GIF
            "06474946383961",           // thumbnail
        );
        assert_eq!(hex::encode(p.to_stored().expect("stores")), expected);
    }

    #[test]
    fn limits_hold_on_both_sides() {
        let text = "https://a.example/x";
        let cases = [
            LinkPreview { url: "https://elsewhere.example/".into(), ..preview() },
            LinkPreview { url: "ftp://a.example/x".into(), ..preview() },
            LinkPreview { url: String::new(), ..preview() },
            LinkPreview { title: "t".repeat(MAX_TITLE_BYTES + 1), ..preview() },
            LinkPreview { description: "d".repeat(MAX_DESCRIPTION_BYTES + 1), ..preview() },
            LinkPreview { thumbnail: Some(Thumbnail { kind: ImageKind::Png, bytes: b"GIF89a".to_vec() }), ..preview() },
            LinkPreview {
                thumbnail: Some(Thumbnail {
                    kind: ImageKind::Gif,
                    bytes: [b"GIF89a".as_slice(), &vec![0; MAX_THUMBNAIL_BYTES]].concat(),
                }),
                ..preview()
            },
        ];
        for p in cases {
            assert!(p.encode_payload(text).is_err(), "{p:?}");
            // Written by a sender that skips the checks, refused on arrival.
            let (kind, thumb) = p.thumbnail_wire();
            let wire = PreviewV1 {
                text: text.as_bytes().to_vec(),
                url: p.url.as_bytes().to_vec(),
                title: p.title.as_bytes().to_vec(),
                description: p.description.as_bytes().to_vec(),
                thumbnail_kind: kind,
                thumbnail: thumb,
            };
            let mut bytes = vec![PREVIEW_V1];
            wire.mls_encode(&mut bytes).expect("encodes");
            assert!(LinkPreview::decode_payload(&bytes).is_err(), "{p:?}");
        }
        // A type without bytes, bytes without a type, trailing bytes.
        let ok = preview().encode_payload(text).expect("encodes");
        for bad in [[ok.clone(), vec![0]].concat(), {
            let mut b = preview();
            b.thumbnail = None;
            let mut v = b.encode_payload(text).expect("encodes");
            let n = v.len();
            v[n - 2] = 1;
            v
        }] {
            assert!(LinkPreview::decode_payload(&bad).is_err());
        }
        assert_eq!(LinkPreview::decode_payload(&[2, 0]).expect("newer"), None);
        assert!(LinkPreview::decode_payload(&[]).is_err());
    }

    #[test]
    fn debug_shows_no_link_or_title() {
        let shown = format!("{:?}", preview());
        assert!(!shown.contains("a.example") && !shown.contains("secret"), "{shown}");
    }
}
