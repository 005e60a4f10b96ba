//! The dangerous-link list: SHA-256 hash prefixes of canonicalised URLs,
//! signed by a key the binary pins, imported by the user from a file and
//! checked on the device. Nothing about a link ever leaves the device to
//! be checked: no lookup, no full-hash request, no report. A prefix that
//! matches marks the link (on both sides of a conversation, each device
//! checking with its own list); since only prefixes are listed, a safe link
//! may share a listed prefix (about one in 2^(8·prefix length) per
//! expression and entry), which is why a list may use prefixes up to the
//! whole 32 bytes.
//!
//! # The file
//! `"SRLL" || format 0x01 || list version (u64, big-endian) || prefix
//! length (u8, 4 to 32) || count (u32, big-endian, at most
//! [`MAX_ENTRIES`]) || the prefixes, strictly increasing || Ed25519
//! signature (64 bytes)` over [`SIGNATURE_CONTEXT`] followed by every byte
//! before the signature. One meaning, one encoding: unsorted or repeated
//! prefixes, a length that does not add up, or anything after the
//! signature are refused. The list version only grows: a device refuses a
//! list older than the one it holds (that rule is the client's, which
//! knows what it holds).
//!
//! # Canonicalisation
//! A link is written with `http://` or `https://` (case does not matter);
//! other schemes are not checked. Its canonical host and path are those of
//! the WHATWG URL parser (the `url` crate): scheme and host lower-cased,
//! international names in punycode, IPv4 addresses in dotted decimal
//! whatever form they were written in, `.` and `..` segments resolved,
//! characters percent-encoded as the standard says (an existing
//! percent-encoding is kept as written). Then user name, password, port and
//! fragment are dropped, trailing dots of the host removed and runs of `/`
//! in the path made one. The expressions hashed for a link are, in order:
//! - `host` + `path` + `?query` (only with a non-empty query),
//! - `host` + `path`,
//! - `domain/` for the host and each parent domain of at least two labels
//!   (at most five, the host included; an IP address is its own only),
//!
//! so a list can name one page, every query of a page, or a whole domain
//! with its subdomains. A list maker hashes the same expressions.

use sha2::{Digest, Sha256};

/// The first bytes of a list file.
pub const MAGIC: &[u8; 4] = b"SRLL";
/// The file format this version reads.
pub const FORMAT_V1: u8 = 1;
/// What the signature covers, before the file's bytes: no signature made
/// for something else verifies as a list.
pub const SIGNATURE_CONTEXT: &[u8] = b"subrosa dangerous-link list v1\0";
/// Most prefixes one list holds.
pub const MAX_ENTRIES: usize = 1 << 22;
/// Shortest prefix, in bytes.
pub const MIN_PREFIX: usize = 4;
/// Longest prefix (a whole SHA-256), in bytes.
pub const MAX_PREFIX: usize = 32;
/// Largest list file: the most prefixes of the longest length, plus the
/// header and signature.
pub const MAX_FILE_BYTES: usize = HEADER_BYTES + MAX_ENTRIES * MAX_PREFIX + SIGNATURE_BYTES;

const HEADER_BYTES: usize = 4 + 1 + 8 + 1 + 4;
const SIGNATURE_BYTES: usize = 64;
/// Most host expressions per link.
const MAX_HOSTS: usize = 5;

/// The public half of the key that signs released lists. Its secret was
/// made outside this repository and never entered it; release builds trust
/// this key only.
pub const RELEASE_KEY: [u8; 32] = [
    0x42, 0xae, 0x5c, 0x16, 0xbf, 0xb4, 0x2b, 0xc2, 0x89, 0x57, 0xc6, 0xa9, 0x7a, 0x22, 0x90, 0x9a, 0x73, 0x63, 0x58,
    0x41, 0xe0, 0x1d, 0x24, 0x70, 0x08, 0x4b, 0x15, 0x91, 0x2c, 0x0f, 0xd1, 0x74,
];

/// Why a list file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListError {
    /// Not a list file of a format this version reads, or not canonical.
    #[error("not a dangerous-link list: {0}")]
    Malformed(&'static str),
    /// Well formed, but no trusted key signed it.
    #[error("the dangerous-link list's signature is not from a trusted key")]
    BadSignature,
}

/// A verified list.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkList {
    version: u64,
    prefix_len: usize,
    /// The prefixes, concatenated, strictly increasing.
    prefixes: Vec<u8>,
}

impl std::fmt::Debug for LinkList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkList")
            .field("version", &self.version)
            .field("prefix_len", &self.prefix_len)
            .field("entries", &self.len())
            .finish()
    }
}

/// The bytes of a list before its signature (what a list maker signs,
/// after [`SIGNATURE_CONTEXT`]). `prefixes` are sorted and made unique here.
///
/// # Errors
/// [`ListError::Malformed`] for a prefix length out of range, a prefix of
/// another length, or too many prefixes.
pub fn unsigned_list(version: u64, prefix_len: usize, prefixes: &[Vec<u8>]) -> Result<Vec<u8>, ListError> {
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix_len) {
        return Err(ListError::Malformed("prefix length"));
    }
    let mut sorted: Vec<&Vec<u8>> = prefixes.iter().collect();
    if sorted.iter().any(|p| p.len() != prefix_len) {
        return Err(ListError::Malformed("a prefix of another length"));
    }
    sorted.sort();
    sorted.dedup();
    if sorted.len() > MAX_ENTRIES {
        return Err(ListError::Malformed("too many prefixes"));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + sorted.len() * prefix_len);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_V1);
    out.extend_from_slice(&version.to_be_bytes());
    out.push(prefix_len as u8);
    out.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
    for p in sorted {
        out.extend_from_slice(p);
    }
    Ok(out)
}

/// What the signature of a list covers: [`SIGNATURE_CONTEXT`] || `unsigned`.
pub fn signed_message(unsigned: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, unsigned].concat()
}

impl LinkList {
    /// Reads and verifies a list file: canonical, and signed by one of
    /// `trusted` (Ed25519 public keys).
    ///
    /// # Errors
    /// [`ListError::Malformed`] or [`ListError::BadSignature`].
    pub fn verify(bytes: &[u8], trusted: &[[u8; 32]]) -> Result<Self, ListError> {
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ListError::Malformed("too large"));
        }
        if bytes.len() < HEADER_BYTES + SIGNATURE_BYTES || &bytes[..4] != MAGIC {
            return Err(ListError::Malformed("no list header"));
        }
        if bytes[4] != FORMAT_V1 {
            return Err(ListError::Malformed("a format this version does not read"));
        }
        let mut version = [0u8; 8];
        version.copy_from_slice(&bytes[5..13]);
        let version = u64::from_be_bytes(version);
        let prefix_len = usize::from(bytes[13]);
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix_len) {
            return Err(ListError::Malformed("prefix length"));
        }
        let mut count = [0u8; 4];
        count.copy_from_slice(&bytes[14..18]);
        let count = u32::from_be_bytes(count) as usize;
        if count > MAX_ENTRIES {
            return Err(ListError::Malformed("too many prefixes"));
        }
        let body_end = HEADER_BYTES + count * prefix_len;
        if bytes.len() != body_end + SIGNATURE_BYTES {
            return Err(ListError::Malformed("its length does not match its count"));
        }
        let prefixes = &bytes[HEADER_BYTES..body_end];
        let mut chunks = prefixes.chunks_exact(prefix_len);
        let mut previous = chunks.next();
        for p in chunks {
            if previous.is_some_and(|q| q >= p) {
                return Err(ListError::Malformed("prefixes not strictly increasing"));
            }
            previous = Some(p);
        }
        let signature =
            ed25519_dalek::Signature::from_slice(&bytes[body_end..]).map_err(|_| ListError::Malformed("signature"))?;
        let message = signed_message(&bytes[..body_end]);
        let signed = trusted.iter().any(|key| {
            ed25519_dalek::VerifyingKey::from_bytes(key).is_ok_and(|k| k.verify_strict(&message, &signature).is_ok())
        });
        if !signed {
            return Err(ListError::BadSignature);
        }
        Ok(LinkList { version, prefix_len, prefixes: prefixes.to_vec() })
    }

    /// The list's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many prefixes it holds.
    pub fn len(&self) -> usize {
        self.prefixes.len() / self.prefix_len
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    fn has_prefix(&self, digest: &[u8]) -> bool {
        let Some(prefix) = digest.get(..self.prefix_len) else { return false };
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = &self.prefixes[mid * self.prefix_len..(mid + 1) * self.prefix_len];
            match at.cmp(prefix) {
                std::cmp::Ordering::Equal => return true,
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        false
    }

    /// Whether one of `link`'s expressions is listed (see the module).
    pub fn lists(&self, link: &str) -> bool {
        expressions(link).iter().any(|e| self.has_prefix(&Sha256::digest(e.as_bytes())))
    }

    /// The links of `text` this list names, each once, in order.
    pub fn dangerous_links(&self, text: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for link in links_in(text) {
            if !out.iter().any(|l| l == link) && self.lists(link) {
                out.push(link.to_string());
            }
        }
        out
    }
}

/// The links of a text: every run that starts with `http://` or
/// `https://` (any case), up to white space or one of `<>"`, without the
/// punctuation that usually ends a sentence or closes a bracket after it.
pub fn links_in(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for token in text.split(|c: char| c.is_whitespace()) {
        let mut rest = token;
        while let Some(start) = find_scheme(rest) {
            let from = &rest[start..];
            let end = from.find(['<', '>', '"']).unwrap_or(from.len());
            let link = from[..end].trim_end_matches(['.', ',', ';', ':', '!', '?', ')', ']', '}', '\'']);
            let after_scheme = link.find("//").map_or(0, |i| i + 2);
            if link.len() > after_scheme {
                out.push(link);
            }
            rest = &from[end.max(1)..];
        }
    }
    out
}

fn find_scheme(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    match (lower.find("http://"), lower.find("https://")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The canonical expressions of a link that a list may name (see the
/// module), or none for a link that is not http(s) with a host.
pub fn expressions(link: &str) -> Vec<String> {
    let Ok(url) = url::Url::parse(link.trim()) else { return Vec::new() };
    if !matches!(url.scheme(), "http" | "https") {
        return Vec::new();
    }
    let (host, is_ip) = match url.host() {
        Some(url::Host::Domain(d)) => (d.trim_end_matches('.').to_string(), false),
        Some(url::Host::Ipv4(a)) => (a.to_string(), true),
        Some(url::Host::Ipv6(a)) => (format!("[{a}]"), true),
        None => return Vec::new(),
    };
    if host.is_empty() {
        return Vec::new();
    }
    let mut path = String::with_capacity(url.path().len());
    for c in url.path().chars() {
        if !(c == '/' && path.ends_with('/')) {
            path.push(c);
        }
    }
    if path.is_empty() {
        path.push('/');
    }
    let mut out = Vec::new();
    if let Some(q) = url.query().filter(|q| !q.is_empty()) {
        out.push(format!("{host}{path}?{q}"));
    }
    out.push(format!("{host}{path}"));
    if is_ip {
        out.push(format!("{host}/"));
    } else {
        let labels: Vec<&str> = host.split('.').collect();
        for skip in 0..labels.len().saturating_sub(1).min(MAX_HOSTS) {
            out.push(format!("{}/", labels[skip..].join(".")));
        }
        if labels.len() == 1 {
            out.push(format!("{host}/"));
        }
    }
    out.dedup();
    out
}

/// The SHA-256 of each expression of `link` (what a list maker lists a
/// prefix of; the first is the most specific).
pub fn link_hashes(link: &str) -> Vec<[u8; 32]> {
    expressions(link).iter().map(|e| Sha256::digest(e.as_bytes()).into()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use ed25519_dalek::Signer;

    use super::*;

    #[test]
    fn canonicalisation_folds_the_forms_of_one_link() {
        let same = [
            "https://Evil.Example/login",
            "HTTPS://evil.example./login#frag",
            "https://user:pw@evil.example:8443/login",
            "http://evil.example//login",
            "https://evil.example/a/../login",
            "https://EVIL.example/./login",
        ];
        for link in same {
            let e = expressions(link);
            assert_eq!(e.first().map(String::as_str), Some("evil.example/login"), "{link}: {e:?}");
        }
        assert_eq!(
            expressions("https://a.b.c.evil.example/p?q=1"),
            [
                "a.b.c.evil.example/p?q=1",
                "a.b.c.evil.example/p",
                "a.b.c.evil.example/",
                "b.c.evil.example/",
                "c.evil.example/",
                "evil.example/"
            ]
        );
        // IPv4 in any of its written forms is one address; IDNs are punycode.
        assert_eq!(expressions("http://3232235777/x")[0], "192.168.1.1/x");
        assert_eq!(expressions("http://0xC0.0xA8.1.1/x")[0], "192.168.1.1/x");
        assert_eq!(expressions("https://bücher.example")[0], "xn--bcher-kva.example/");
        // Not checked: other schemes, no host.
        assert!(expressions("ftp://evil.example/x").is_empty());
        assert!(expressions("javascript:alert(1)").is_empty());
        assert!(expressions("https://").is_empty());
        // Never more than five hosts (the page `host/` is the first of them).
        assert_eq!(
            expressions("https://a.b.c.d.e.f.g.h/"),
            ["a.b.c.d.e.f.g.h/", "b.c.d.e.f.g.h/", "c.d.e.f.g.h/", "d.e.f.g.h/", "e.f.g.h/"]
        );
        // The example of docs/links.md.
        assert_eq!(
            expressions("https://user@WWW.Evil.Example.:443//a/../login?x=1#top"),
            ["www.evil.example/login?x=1", "www.evil.example/login", "www.evil.example/", "evil.example/"]
        );
    }

    #[test]
    fn links_are_found_in_text_without_their_punctuation() {
        assert_eq!(
            links_in("see https://a.example/x, (HTTP://b.example/y) and <https://c.example/z>. no http:// here"),
            ["https://a.example/x", "HTTP://b.example/y", "https://c.example/z"]
        );
        assert_eq!(links_in("x https://a.example/1https://b.example/2"), ["https://a.example/1https://b.example/2"]);
        assert!(links_in("plain words, ftp://x").is_empty());
    }

    fn key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn signed(k: &ed25519_dalek::SigningKey, version: u64, prefix_len: usize, links: &[&str]) -> Vec<u8> {
        let prefixes: Vec<Vec<u8>> = links.iter().map(|l| link_hashes(l)[0][..prefix_len].to_vec()).collect();
        let unsigned = unsigned_list(version, prefix_len, &prefixes).expect("list");
        let sig = k.sign(&signed_message(&unsigned));
        [unsigned, sig.to_bytes().to_vec()].concat()
    }

    /// The list file before its signature, byte for byte (list makers
    /// write it; a change is a new format number).
    #[test]
    fn snapshot_of_the_file_format() {
        let unsigned = unsigned_list(0x0102, 4, &[vec![9, 9, 9, 9], vec![1, 2, 3, 4], vec![9, 9, 9, 9]]).expect("list");
        let expected = concat!(
            "53524c4c",         // "SRLL"
            "01",               // format 1
            "0000000000000102", // list version
            "04",               // prefix length
            "00000002",         // count (the repeated prefix once)
            "01020304",         // prefixes, increasing
            "09090909",
        );
        assert_eq!(hex::encode(&unsigned), expected);
        assert_eq!(&signed_message(&unsigned)[..SIGNATURE_CONTEXT.len()], b"subrosa dangerous-link list v1\0");
    }

    #[test]
    fn a_signed_list_marks_its_links_and_nothing_else() {
        let k = key(7);
        let trusted = [k.verifying_key().to_bytes()];
        let bytes = signed(&k, 3, 4, &["https://evil.example/", "https://phish.example/login"]);
        let list = LinkList::verify(&bytes, &trusted).expect("verifies");
        assert_eq!((list.version(), list.len()), (3, 2));
        assert!(list.lists("https://www.EVIL.example/anything?x=1"));
        assert!(list.lists("http://phish.example//login#top"));
        assert!(!list.lists("https://phish.example/other"));
        assert!(!list.lists("https://example.org/"));
        assert_eq!(
            list.dangerous_links("a https://sub.evil.example/x b https://ok.example/ https://sub.evil.example/x"),
            ["https://sub.evil.example/x"]
        );
    }

    #[test]
    fn refuses_other_keys_garbage_and_non_canonical_lists() {
        let k = key(7);
        let trusted = [k.verifying_key().to_bytes()];
        let good = signed(&k, 1, 8, &["https://a.example/", "https://b.example/"]);
        assert!(LinkList::verify(&good, &trusted).is_ok());
        // Signed by another key; the release key does not take a test key's list.
        let other = signed(&key(8), 1, 8, &["https://a.example/"]);
        assert_eq!(LinkList::verify(&other, &trusted), Err(ListError::BadSignature));
        assert_eq!(LinkList::verify(&good, &[RELEASE_KEY]), Err(ListError::BadSignature));
        // Any flipped byte.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(LinkList::verify(&bad, &trusted).is_err(), "byte {i}");
        }
        // Truncated, extended, garbage.
        for n in 0..good.len() {
            assert!(LinkList::verify(&good[..n], &trusted).is_err());
        }
        assert!(LinkList::verify(&[good.clone(), vec![0]].concat(), &trusted).is_err());
        assert!(LinkList::verify(
            b"not a list at all, just some text that is long enough....................",
            &trusted
        )
        .is_err());
        // Unsorted prefixes, even correctly signed.
        let mut unsigned = unsigned_list(1, 4, &[vec![1, 1, 1, 1], vec![2, 2, 2, 2]]).expect("list");
        let n = unsigned.len();
        unsigned[n - 8..].copy_from_slice(&[2, 2, 2, 2, 1, 1, 1, 1]);
        let sig = k.sign(&signed_message(&unsigned)).to_bytes();
        assert_eq!(
            LinkList::verify(&[unsigned, sig.to_vec()].concat(), &trusted),
            Err(ListError::Malformed("prefixes not strictly increasing"))
        );
        // A count beyond the limit is refused before anything is read.
        let mut huge = good;
        huge[14..18].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(LinkList::verify(&huge, &trusted), Err(ListError::Malformed(_))));
    }
}
