//! The configuration file: `HOME/config.toml`, the user's own defaults for
//! what the flags say. A flag (or its environment variable) wins over the
//! file, the file over the built-in default. The file is the user's and
//! nothing else writes it: no server, peer or update hands a client
//! settings (DESIGN.md: clients take no rules from the server).
//!
//! ```toml
//! # The server `register`, `link` and `audit` use without --server.
//! server = "https://chat.example.org"
//! # How long the store key stays cached (as --key-cache): seconds, 15m, 1h, off.
//! key_cache = "1h"
//! # false: commands never go through a running daemon (as --no-daemon).
//! daemon = true
//! # Where `receive` saves attachments (as --downloads); outside the home
//! # directory, whose files stay encrypted.
//! downloads = "/home/me/Downloads/subrosa"
//! # Desktop notifications of `subrosa tui` (as --notifications): "off",
//! # "on" (who wrote, never what) or "with-text".
//! notifications = "on"
//! # Link previews of your messages (as `settings previews`, which wins):
//! # your device fetches the link, so the site sees your IP address...
//! previews = true
//! # ...unless the preview goes through a proxy (http://, https:// or socks5://).
//! preview_proxy = "socks5://127.0.0.1:9050"
//! ```
//!
//! A key this version does not know is an error that names it, so a typo
//! never silently leaves a setting at its default.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::Deserialize;
use subrosa_client::keycache::CachePolicy;

/// The file's name in the home directory.
pub const FILE: &str = "config.toml";

/// Largest configuration file read (it is a few lines).
const MAX_BYTES: u64 = 64 * 1024;

/// What the file says; every field optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server for `register`, `link` and `audit` without `--server`.
    pub server: Option<String>,
    /// As `--key-cache`.
    pub key_cache: Option<String>,
    /// `false`: as `--no-daemon`.
    pub daemon: Option<bool>,
    /// As `receive --downloads`: where received files are saved.
    pub downloads: Option<PathBuf>,
    /// As `tui --notifications`: desktop notifications (off by default).
    pub notifications: Option<crate::tui::notify::Notifications>,
    /// Link previews of this device's messages, unless `settings previews`
    /// says otherwise.
    pub previews: Option<bool>,
    /// The proxy every preview request goes through.
    pub preview_proxy: Option<String>,
}

/// Plaintext goes only where the user asked, and never among the home
/// directory's encrypted files (nor is a relative path resolved against
/// wherever a command happens to run): why `dir` is no place for saved
/// files, if it is not.
fn downloads_place(home: &Path, dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err("must be an absolute path".into());
    }
    let home_abs = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let d_abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if d_abs.starts_with(&home_abs) || dir.starts_with(home) {
        return Err(format!("must be outside the home directory {} (its files stay encrypted)", home.display()));
    }
    Ok(())
}

/// Checks a directory files are about to be saved into: absolute, outside
/// the home directory, and there.
///
/// # Errors
/// One line naming `dir` and what is wrong with it.
pub fn check_downloads(home: &Path, dir: &Path) -> Result<()> {
    downloads_place(home, dir).map_err(|e| anyhow!("downloads {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(anyhow!("downloads {}: not a directory", dir.display()));
    }
    Ok(())
}

/// The file of `home`.
pub fn path(home: &Path) -> PathBuf {
    home.join(FILE)
}

impl Config {
    /// Reads `HOME/config.toml`; none there is the defaults.
    ///
    /// # Errors
    /// An unreadable file, or one that is not valid (with the line and what
    /// is wrong, in one line).
    pub fn load(home: &Path) -> Result<Self> {
        let path = path(home);
        let text = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
            Ok(m) if m.len() > MAX_BYTES => {
                return Err(anyhow!("{} is larger than 64 KiB; it holds a few settings", path.display()))
            }
            Ok(_) => std::fs::read_to_string(&path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?,
        };
        let config = Self::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if let Some(d) = &config.downloads {
            downloads_place(home, d).map_err(|e| anyhow!("{}: downloads {e}", path.display()))?;
        }
        Ok(config)
    }

    /// Parses the file's text.
    ///
    /// # Errors
    /// Not TOML, an unknown key, a value of the wrong type or form: one
    /// line saying which and where.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().and_then(|s| text.get(..s.start)).map(|before| before.matches('\n').count() + 1);
            let what = e.message().replace('\n', " ");
            match line {
                Some(n) => anyhow!("line {n}: {what}"),
                None => anyhow!("{what}"),
            }
        })?;
        if let Some(k) = &config.key_cache {
            k.parse::<CachePolicy>().map_err(|e| anyhow!("key_cache: {e}"))?;
        }
        if let Some(p) = &config.preview_proxy {
            let ok = url::Url::parse(p)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https" | "socks5" | "socks5h") && u.host().is_some());
            if !ok {
                return Err(anyhow!("preview_proxy: not a proxy URL (http://, https:// or socks5://HOST:PORT)"));
            }
        }
        Ok(config)
    }

    /// The key-cache policy: the flag's, else the file's, else the default.
    ///
    /// # Errors
    /// A file value that does not parse (checked on load already).
    pub fn key_cache(&self, flag: Option<CachePolicy>) -> Result<CachePolicy> {
        match (flag, &self.key_cache) {
            (Some(p), _) => Ok(p),
            (None, Some(k)) => k.parse().map_err(|e| anyhow!("key_cache: {e}")),
            (None, None) => Ok(CachePolicy::default()),
        }
    }

    /// The server: the flag's, else the file's.
    ///
    /// # Errors
    /// Neither gives one.
    pub fn server(&self, flag: Option<String>, home: &Path) -> Result<String> {
        flag.or_else(|| self.server.clone()).ok_or_else(|| {
            anyhow!("no server: give --server URL, or set `server = \"URL\"` in {}", path(home).display())
        })
    }

    /// Whether commands may go through a running daemon.
    pub fn use_daemon(&self, no_daemon_flag: bool) -> bool {
        !no_daemon_flag && self.daemon != Some(false)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults_and_every_key_is_read() {
        assert_eq!(Config::parse("").expect("empty"), Config::default());
        let c = Config::parse("server = \"https://chat.example.org\"\nkey_cache = \"off\"\ndaemon = false\n")
            .expect("valid");
        assert_eq!(c.server.as_deref(), Some("https://chat.example.org"));
        assert_eq!(c.key_cache(None).expect("policy"), CachePolicy::off());
        assert!(!c.use_daemon(false));
        // A flag wins over the file.
        assert_eq!(c.key_cache(Some(CachePolicy::default())).expect("policy"), CachePolicy::default());
        assert_eq!(c.server(Some("https://other".into()), Path::new("/h")).expect("flag"), "https://other");
    }

    #[test]
    fn a_typo_or_a_bad_value_is_one_line_naming_where() {
        let e = Config::parse("server = \"x\"\nsevrer = \"y\"\n").expect_err("unknown key").to_string();
        assert!(e.starts_with("line 2:") && e.contains("sevrer") && !e.contains('\n'), "{e}");
        let e = Config::parse("key_cache = \"forever\"").expect_err("bad policy").to_string();
        assert!(e.starts_with("key_cache:"), "{e}");
        let e = Config::parse("daemon = \"yes\"").expect_err("wrong type").to_string();
        assert!(e.starts_with("line 1:") && !e.contains('\n'), "{e}");
        let e = Config::parse("preview_proxy = \"not a url\"").expect_err("bad proxy").to_string();
        assert!(e.starts_with("preview_proxy:"), "{e}");
        let c = Config::parse("previews = true\npreview_proxy = \"socks5://127.0.0.1:9050\"").expect("valid");
        assert_eq!((c.previews, c.preview_proxy.as_deref()), (Some(true), Some("socks5://127.0.0.1:9050")));
        let c = Config::parse("downloads = \"/srv/files\"").expect("valid");
        assert_eq!(c.downloads.as_deref(), Some(Path::new("/srv/files")));
        let e = Config::default().server(None, Path::new("/h")).expect_err("none").to_string();
        assert!(e.contains("/h/config.toml"), "{e}");
    }
}
