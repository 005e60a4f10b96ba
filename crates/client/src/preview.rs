//! Link previews, made by the sender's own device and by nobody else.
//!
//! When the user asks for one (`send --preview`, or previews turned on),
//! this device fetches the first link of the text with an HTTP client of
//! its own, made for this and nothing else:
//! - HTTPS only (plain HTTP to 127.0.0.1 only in a debug build whose
//!   environment asks for it, for the end-to-end tests: see
//!   [`loopback_http_allowed`]); no link with a user name or password; no
//!   HTTPS to a loopback, private or link-local address, whether given as
//!   a number or by a name that resolves to one ([`PublicOnly`]: the
//!   addresses checked are the ones connected to, so a name that answers
//!   differently the second time gains nothing);
//! - no cookies (the client keeps none), no `Referer`, a fixed neutral
//!   user agent ([`USER_AGENT`]) that names neither Subrosa nor a version;
//! - at most [`MAX_REDIRECTS`] redirects, each hop checked as the first;
//! - at most [`MAX_PAGE_BYTES`] of the page and [`TIME_LIMIT`] for all of
//!   it, thumbnail included;
//! - at most one thumbnail (the page's `og:image`), at most
//!   [`subrosa_core::preview::MAX_THUMBNAIL_BYTES`], and only a PNG, JPEG,
//!   GIF or WebP by its first bytes (not re-encoded: recipients never
//!   decode it here; a front end that shows it must decode it as untrusted);
//! - through the configured proxy when there is one, else directly (the
//!   environment's proxy variables are ignored, so a preview goes nowhere
//!   the user did not name).
//!
//! The site learns what any visit tells it: this device's IP address (or
//! the proxy's), the time, and that someone fetched the link. Title,
//! description and thumbnail then travel inside the MLS message
//! ([`subrosa_core::preview`]); recipients show them as the sender's word
//! and never fetch anything.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use subrosa_core::preview::{ImageKind, LinkPreview, Thumbnail, MAX_THUMBNAIL_BYTES};
use url::Url;

/// The user agent of every preview request: neutral and fixed.
pub const USER_AGENT: &str = "Mozilla/5.0 (compatible)";
/// Most of a page read, in bytes (the head, where titles are, comes first).
pub const MAX_PAGE_BYTES: usize = 512 * 1024;
/// The most redirects followed.
pub const MAX_REDIRECTS: usize = 3;
/// The longest a preview may take, thumbnail included.
pub const TIME_LIMIT: Duration = Duration::from_secs(5);
/// The environment variable that lets a debug build fetch plain HTTP from
/// 127.0.0.1 (the end-to-end tests' canary). Release builds ignore it.
pub const LOOPBACK_HTTP_ENV: &str = "SUBROSA_TEST_PREVIEW_LOOPBACK_HTTP";

/// Why no preview was made (the message goes without one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreviewError {
    /// The text has no link this device would fetch.
    #[error("no https link in the message")]
    NoLink,
    /// The proxy setting is not a proxy URL.
    #[error("preview proxy: {0}")]
    Proxy(String),
    /// The page could not be fetched or read.
    #[error("{0}")]
    Fetch(String),
    /// The page took longer than allowed.
    #[error("the page took longer than {} s", TIME_LIMIT.as_secs())]
    Timeout,
}

/// How previews are fetched.
#[derive(Debug, Clone, Default)]
pub struct PreviewPolicy {
    /// A proxy for every preview request (`http://`, `https://` or
    /// `socks5://` URL, as reqwest reads them).
    pub proxy: Option<String>,
    /// Plain HTTP to 127.0.0.1 is allowed (tests only: see
    /// [`loopback_http_allowed`]).
    pub loopback_http: bool,
}

/// Whether this build honours [`LOOPBACK_HTTP_ENV`]: only debug builds
/// (`cfg(debug_assertions)`, which the end-to-end tests run and
/// `cargo build --release` turns off), so a release binary never fetches
/// a preview over plain HTTP whatever its environment says.
pub fn loopback_http_allowed() -> bool {
    #[cfg(debug_assertions)]
    {
        std::env::var_os(LOOPBACK_HTTP_ENV).is_some_and(|v| v == "1")
    }
    #[cfg(not(debug_assertions))]
    {
        false
    }
}

impl PreviewPolicy {
    /// HTTPS only, directly or through `proxy`; plain HTTP to 127.0.0.1
    /// only where [`loopback_http_allowed`].
    pub fn new(proxy: Option<String>) -> Self {
        PreviewPolicy { proxy, loopback_http: loopback_http_allowed() }
    }

    /// Whether a URL may be fetched (every redirect hop is asked too).
    ///
    /// # Errors
    /// Why not, in words.
    pub fn check(&self, url: &Url) -> Result<(), String> {
        if !url.username().is_empty() || url.password().is_some() {
            return Err("a link with a user name or password is not fetched".into());
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
            Some(url::Host::Domain(_)) => None,
            None => return Err("a link without a host".into()),
        };
        let test_loopback = self.loopback_http && ip == Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        match url.scheme() {
            "https" => {}
            "http" if test_loopback => {}
            _ => return Err("only https links are fetched for a preview".into()),
        }
        if let Some(ip) = ip.filter(|ip| !is_public(ip)) {
            if !test_loopback {
                return Err(format!("{ip} is not a public address"));
            }
        }
        Ok(())
    }
}

fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback() || a.is_private() || a.is_link_local() || a.is_unspecified() || a.is_broadcast())
                && a.octets()[0] != 100 // carrier-grade NAT and other shared space, conservatively
        }
        IpAddr::V6(a) => {
            let s = a.segments()[0];
            !(a.is_loopback() || a.is_unspecified() || (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80)
                && a.to_ipv4_mapped().is_none_or(|v4| is_public(&IpAddr::V4(v4)))
        }
    }
}

/// The preview client's resolver: the system's, keeping only public
/// addresses ([`is_public`]); a name with none is not fetched. Every hop
/// (redirects, the thumbnail) resolves through it, and the client connects
/// only to what it returned. Through a proxy that resolves names itself
/// (`socks5h://`), the proxy's network decides instead.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<std::net::SocketAddr> = found.filter(|a| is_public(&a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} has no public address").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The first link of `text` that `policy` lets this device fetch.
pub fn first_link<'t>(text: &'t str, policy: &PreviewPolicy) -> Option<&'t str> {
    subrosa_core::linklist::links_in(text).into_iter().find(|l| Url::parse(l).is_ok_and(|u| policy.check(&u).is_ok()))
}

fn client(policy: &PreviewPolicy) -> Result<reqwest::Client, PreviewError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PreviewError::Fetch(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let hops = policy.clone();
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        match hops.check(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(format!("redirected to a link not fetched: {why}")),
        }
    });
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .user_agent(USER_AGENT)
        .referer(false)
        .redirect(redirects)
        .timeout(TIME_LIMIT)
        .connect_timeout(TIME_LIMIT)
        .dns_resolver(Arc::new(PublicOnly))
        .no_proxy();
    if let Some(p) = &policy.proxy {
        b = b.proxy(reqwest::Proxy::all(p).map_err(|e| PreviewError::Proxy(e.to_string()))?);
    }
    b.build().map_err(|e| PreviewError::Fetch(e.to_string()))
}

/// Reads at most `limit` bytes of a response; `None` when it is longer.
async fn read_limited(mut r: reqwest::Response, limit: usize, truncate: bool) -> Result<Vec<u8>, PreviewError> {
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| PreviewError::Fetch(plain(&e)))? {
        if out.len() + chunk.len() > limit {
            if truncate {
                out.extend_from_slice(&chunk[..limit - out.len()]);
                return Ok(out);
            }
            return Err(PreviewError::Fetch(format!("larger than {limit} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A reqwest error in one line, without the URL (the caller knows it).
fn plain(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_redirect() {
        "redirect refused".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else if let Some(s) = e.status() {
        format!("HTTP {s}")
    } else {
        "request failed".to_string()
    };
    // The innermost cause says most ("… has no public address",
    // "Connection refused").
    let mut inner = std::error::Error::source(e);
    while let Some(next) = inner.and_then(std::error::Error::source) {
        inner = Some(next);
    }
    match inner {
        Some(inner) => format!("{what}: {inner}"),
        None => what,
    }
}

/// Makes the preview of the first link of `text` that `policy` allows:
/// fetches the page (and at most one thumbnail) within the limits above.
///
/// # Errors
/// [`PreviewError`]: no link, a bad proxy, a page that could not be
/// fetched or read in time.
pub async fn make(text: &str, policy: &PreviewPolicy) -> Result<LinkPreview, PreviewError> {
    let link = first_link(text, policy).ok_or(PreviewError::NoLink)?;
    let url = Url::parse(link).map_err(|e| PreviewError::Fetch(e.to_string()))?;
    let http = client(policy)?;
    let deadline = Instant::now() + TIME_LIMIT;
    let page = tokio::time::timeout(TIME_LIMIT, async {
        let r = http.get(url.clone()).send().await.map_err(|e| PreviewError::Fetch(plain(&e)))?;
        if !r.status().is_success() {
            return Err(PreviewError::Fetch(format!("HTTP {}", r.status())));
        }
        let final_url = r.url().clone();
        let html = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|t| t.to_ascii_lowercase().contains("html"));
        if !html {
            return Err(PreviewError::Fetch("not an HTML page".into()));
        }
        Ok((final_url, read_limited(r, MAX_PAGE_BYTES, true).await?))
    })
    .await
    .map_err(|_| PreviewError::Timeout)??;
    let (final_url, body) = page;
    let found = extract(&String::from_utf8_lossy(&body));
    let mut preview = LinkPreview {
        url: link.to_string(),
        title: found.title.unwrap_or_default(),
        description: found.description.unwrap_or_default(),
        thumbnail: None,
    };
    if let Some(image) = found.image.and_then(|i| final_url.join(&i).ok()) {
        let left = deadline.saturating_duration_since(Instant::now());
        // A thumbnail that cannot be had is no reason to drop the preview.
        if policy.check(&image).is_ok() && !left.is_zero() {
            if let Ok(Ok(t)) = tokio::time::timeout(left, thumbnail(&http, image)).await {
                preview.thumbnail = Some(t);
            }
        }
    }
    Ok(preview)
}

async fn thumbnail(http: &reqwest::Client, url: Url) -> Result<Thumbnail, PreviewError> {
    let r = http.get(url).send().await.map_err(|e| PreviewError::Fetch(plain(&e)))?;
    if !r.status().is_success() {
        return Err(PreviewError::Fetch(format!("HTTP {}", r.status())));
    }
    let bytes = read_limited(r, MAX_THUMBNAIL_BYTES, false).await?;
    let kind = ImageKind::sniff(&bytes).ok_or_else(|| PreviewError::Fetch("not a PNG, JPEG, GIF or WebP".into()))?;
    Ok(Thumbnail { kind, bytes })
}

/// What a page says of itself.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// `og:title`, else `<title>`.
    pub title: Option<String>,
    /// `og:description`, else `<meta name="description">`.
    pub description: Option<String>,
    /// `og:image`, as written (relative to the page).
    pub image: Option<String>,
}

/// Reads title, description and image out of an HTML page with a WHATWG
/// HTML tokenizer (comments, character references, attribute quoting, and
/// the raw text of `<script>`, `<style>` and `<title>` as browsers read
/// them), each with white space collapsed and cut to the limits of the
/// content encoding ([`subrosa_core::preview`]) at a character boundary.
pub fn extract(html: &str) -> Extracted {
    use html5gum::{DefaultEmitter, Token, Tokenizer};
    let mut emitter = DefaultEmitter::default();
    // `<script>` holds no tags, `<title>` no markup: as a browser reads them.
    emitter.naively_switch_states(true);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut og_title = None;
    let mut og_description = None;
    let mut og_image = None;
    let mut meta_description = None;
    let mut title: Option<String> = None;
    let mut in_title = false;
    for token in Tokenizer::new_with_emitter(html, emitter).flatten() {
        match token {
            Token::StartTag(tag) if tag.name.eq_ignore_ascii_case(b"title") => {
                in_title = title.is_none();
                if in_title {
                    title = Some(String::new());
                }
            }
            Token::EndTag(tag) if tag.name.eq_ignore_ascii_case(b"title") => in_title = false,
            Token::String(s) if in_title => {
                if let Some(t) = title.as_mut().filter(|t| t.len() <= MAX_PAGE_BYTES) {
                    t.push_str(&text(&s.value));
                }
            }
            Token::StartTag(tag) if tag.name.eq_ignore_ascii_case(b"meta") => {
                let get = |k: &str| tag.attributes.get(k.as_bytes()).map(|v| text(&v.value));
                let Some(content) = get("content") else { continue };
                let key = get("property").or_else(|| get("name")).unwrap_or_default().to_ascii_lowercase();
                let slot = match key.as_str() {
                    "og:title" => &mut og_title,
                    "og:description" => &mut og_description,
                    "og:image" | "og:image:url" | "og:image:secure_url" => &mut og_image,
                    "description" => &mut meta_description,
                    _ => continue,
                };
                if slot.is_none() {
                    *slot = Some(content);
                }
            }
            _ => {}
        }
    }
    let tidy = |s: String, max: usize| {
        let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
        let s = cut(&s, max).to_string();
        (!s.is_empty()).then_some(s)
    };
    Extracted {
        title: og_title.or(title).and_then(|t| tidy(t, subrosa_core::preview::MAX_TITLE_BYTES)),
        description: og_description
            .or(meta_description)
            .and_then(|d| tidy(d, subrosa_core::preview::MAX_DESCRIPTION_BYTES)),
        image: og_image.map(|i| i.trim().to_string()).filter(|i| !i.is_empty() && i.len() <= 2048),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_wins_over_title_and_markup_is_html_not_text() {
        let page = r#"<!doctype html><html><head>
            <title>Plain  title</title>
            <!-- <meta property="og:title" content="in a comment"> -->
            <script>document.write('<meta property="og:description" content="in a script">')</script>
            <meta name="description" content="meta description">
            <meta property="og:title" content="OG &amp; title">
            <meta property='og:image' content=/img/t.png>
            </head><body><p>hi</p></body></html>"#;
        let e = extract(page);
        assert_eq!(e.title.as_deref(), Some("OG & title"));
        assert_eq!(e.description.as_deref(), Some("meta description"));
        assert_eq!(e.image.as_deref(), Some("/img/t.png"));
        let plain = extract("<html><head><title>\n  Just\tthe <b>title</b> </title></head></html>");
        assert_eq!(plain, Extracted { title: Some("Just the <b>title</b>".into()), ..Extracted::default() });
        assert_eq!(extract("not html at all"), Extracted::default());
        assert_eq!(extract(""), Extracted::default());
    }

    #[test]
    fn extraction_keeps_to_the_limits() {
        let long_title = "é".repeat(subrosa_core::preview::MAX_TITLE_BYTES);
        let long_description = "d".repeat(5000);
        let page = format!(
            "<title>{long_title}</title><meta name=description content=\"{long_description}\">\
             <meta property=og:image content=\"https://x.example/{}\">",
            "i".repeat(3000)
        );
        let e = extract(&page);
        let t = e.title.unwrap_or_default();
        assert!(
            t.len() <= subrosa_core::preview::MAX_TITLE_BYTES && t.len() >= subrosa_core::preview::MAX_TITLE_BYTES - 1
        );
        assert!(t.chars().all(|c| c == 'é'));
        assert_eq!(e.description.map(|d| d.len()), Some(subrosa_core::preview::MAX_DESCRIPTION_BYTES));
        assert_eq!(e.image, None, "an image URL over 2 KiB is dropped");
        // What extraction keeps, the encoding takes.
        let p = LinkPreview { url: "https://a.example/".into(), title: t, ..LinkPreview::default() };
        assert!(p.encode_payload("https://a.example/").is_ok());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_a_private_address_is_never_connected_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let p = PreviewPolicy { proxy: None, loopback_http: false };
        // `localhost` passes the check of the link as written (a name)...
        let link = format!("https://localhost:{port}/invite");
        assert!(p.check(&Url::parse(&link).expect("url")).is_ok());
        // ...but resolves only to loopback: refused before any connection.
        let got = make(&format!("see {link}"), &p).await;
        match got {
            Err(PreviewError::Fetch(why)) => assert!(why.contains("no public address"), "{why}"),
            other => panic!("fetched from a private address: {other:?}"),
        }
        assert!(listener.accept().is_err(), "the preview client connected to 127.0.0.1");
    }

    #[test]
    fn only_https_to_public_hosts_unless_a_test_allows_loopback() {
        let p = PreviewPolicy { proxy: None, loopback_http: false };
        let ok = |s: &str| p.check(&Url::parse(s).expect("url")).is_ok();
        assert!(ok("https://example.org/x"));
        assert!(ok("https://93.184.215.14/"));
        for s in [
            "http://example.org/",
            "http://127.0.0.1:8080/",
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://192.168.0.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://user:pw@example.org/",
            "ftp://example.org/",
        ] {
            assert!(!ok(s), "{s}");
        }
        let t = PreviewPolicy { proxy: None, loopback_http: true };
        assert!(t.check(&Url::parse("http://127.0.0.1:9/x").expect("url")).is_ok());
        assert!(t.check(&Url::parse("http://example.org/").expect("url")).is_err());
        assert!(t.check(&Url::parse("http://10.0.0.1/").expect("url")).is_err());
        assert_eq!(first_link("a ftp://x http://example.org/ https://b.example/ c", &p), Some("https://b.example/"));
        assert_eq!(first_link("http://example.org/", &p), None);
    }
}
