//! TLS to PostgreSQL, against a private PostgreSQL instance this test
//! starts itself (`initdb` and `pg_ctl` on a free port of its own, in a
//! temporary directory, with a certificate made here), never the shared
//! one. It accepts TLS connections only (`hostssl` in `pg_hba.conf`), so a
//! node that connected used TLS. Skipped, saying so, when no `initdb` is
//! found (`/usr/lib/postgresql/*/bin` or `PATH`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_subrosa-server");

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists())
        .collect();
    dirs.sort();
    if let Some(d) = dirs.pop() {
        return Some(d);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(PathBuf::from).find(|d| d.join("initdb").exists())
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root
/// (PostgreSQL refuses to run as root).
fn pg_tool(bin: &Path, tool: &str, args: &[&str]) -> Output {
    let path = bin.join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args).stdin(Stdio::null()).output().expect("run a PostgreSQL tool")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Hands a file or directory to the `postgres` user when we are root.
fn give(path: &Path) {
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().expect("chown");
        assert!(status.success());
    }
}

/// A private PostgreSQL instance with TLS only; stopped on drop.
struct PrivatePg {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrivatePg {
    /// Starts one serving `cert` and `key`; `None` (after saying so) when
    /// PostgreSQL is not installed.
    fn start(cert: &str, key: &str) -> Option<PrivatePg> {
        let Some(bin) = pg_bin_dir() else {
            eprintln!("skipped: no initdb found (looked in /usr/lib/postgresql/*/bin and PATH)");
            return None;
        };
        let dir = tempfile::tempdir().expect("dir");
        let data = dir.path().join("data");
        give(dir.path());
        let out =
            pg_tool(&bin, "initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "-E", "UTF8"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(data.join("server.crt"), cert).expect("cert");
        std::fs::write(data.join("server.key"), key).expect("key");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\n",
            dir.path().display()
        );
        let mut pg_conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        pg_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pg_conf).expect("conf");
        // TLS connections only: a plain one finds no entry and is refused.
        std::fs::write(data.join("pg_hba.conf"), "hostssl all all 127.0.0.1/32 trust\n").expect("hba");
        give(dir.path());
        let key_path = data.join("server.key");
        let out = Command::new("chmod").arg("600").arg(&key_path).output().expect("chmod");
        assert!(out.status.success());
        let log = dir.path().join("log");
        let out = pg_tool(
            &bin,
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(PrivatePg { bin, data, port, dir })
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = pg_tool(&self.bin, "pg_ctl", &["-D", self.data.to_str().unwrap_or(""), "-m", "immediate", "stop"]);
        let _ = &self.dir;
    }
}

/// A CA and a certificate it signed for 127.0.0.1 (an IP address only).
fn ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Subrosa test database CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Starts `subrosa-server` on `database`: its address once ready, or its
/// exit code and stderr when it stops first.
fn node(database: &str) -> Result<(Child, SocketAddr, tempfile::TempDir), (i32, String)> {
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(["--database", database])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    match line.trim().strip_prefix("listening on http://") {
        Some(addr) => Ok((child, addr.parse().expect("addr"), dir)),
        None => {
            let out = child.wait_with_output().expect("wait");
            Err((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_postgresql_over_tls_and_refuse_a_certificate_they_cannot_verify() {
    let (ca, cert, key) = ca_and_server_cert();
    let Some(pg) = PrivatePg::start(&cert, &key) else { return };
    let files = tempfile::tempdir().expect("dir");
    let ca_path = files.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).expect("ca");
    let (other_ca, _, _) = ca_and_server_cert();
    let other_path = files.path().join("other-ca.pem");
    std::fs::write(&other_path, &other_ca).expect("ca");
    let root = |p: &Path| format!("sslrootcert={}", p.display());

    // verify-full with the right CA: the node serves, over TLS.
    let url = pg.url("127.0.0.1", &format!("sslmode=verify-full&{}", root(&ca_path)));
    let (mut child, addr, _data) = node(&url).unwrap_or_else(|(code, err)| panic!("verify-full: exit {code}: {err}"));
    common::register(addr, "alice").await;
    let parsed = subrosa_server::store::postgres::tls::parse(&url).expect("url");
    let (client, conn) = parsed.config.connect(parsed.tls).await.expect("a TLS connection of our own");
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'subrosa-server'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (count, all_tls): (i64, Option<bool>) = (row.get(0), row.get(1));
    assert!(count > 0, "the node has connections");
    assert_eq!(all_tls, Some(true), "every connection of the node is TLS");
    let _ = child.kill();
    let _ = child.wait();

    // require: encrypted, unverified (libpq's meaning).
    let (mut child, _, _data) =
        node(&pg.url("127.0.0.1", "sslmode=require")).unwrap_or_else(|(c, e)| panic!("require: {c}: {e}"));
    let _ = child.kill();
    let _ = child.wait();

    // verify-ca checks the chain but not the name: "localhost" is not in
    // the certificate, which verify-full refuses and verify-ca accepts.
    let ca_only = pg.url("localhost", &format!("sslmode=verify-ca&{}", root(&ca_path)));
    let (mut child, _, _data) = node(&ca_only).unwrap_or_else(|(c, e)| panic!("verify-ca: {c}: {e}"));
    let _ = child.kill();
    let _ = child.wait();
    let (code, err) = node(&pg.url("localhost", &format!("sslmode=verify-full&{}", root(&ca_path))))
        .expect_err("verify-full refuses a certificate for another name");
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // Another CA: refused, in one line, whatever the mode that verifies.
    for mode in ["verify-full", "verify-ca", "require"] {
        let (code, err) = node(&pg.url("127.0.0.1", &format!("sslmode={mode}&{}", root(&other_path))))
            .err()
            .unwrap_or_else(|| panic!("{mode} with another CA connected"));
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("database"), "{err}");
    }
    // Without TLS the private instance has no entry for us.
    let (code, err) = node(&pg.url("127.0.0.1", "sslmode=disable")).expect_err("plain connection refused");
    assert_eq!(code, 1, "{err}");
    // A verifying mode without a root file is a configuration error.
    let (code, err) = node(&pg.url("127.0.0.1", "sslmode=verify-full")).expect_err("no root file");
    assert_eq!(code, 1);
    assert!(err.contains("sslrootcert"), "{err}");
}
