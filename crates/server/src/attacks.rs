//! A malicious operator, for tests only (feature `test-attacks`).
//!
//! Nothing here runs unless an [`Attacks`] controller is installed in the
//! state ([`crate::AppState::with_attacks`] or `ServerConfig::attacks`),
//! which only the `subrosa-attack-server` binary does; the `subrosa-server`
//! binary is built without this feature. The controller re-reads its plan,
//! `<data-dir>/attacks.json`, on every hook call, so a test can switch
//! attacks on and off while the server runs; a missing file means honest.
//! The format is documented in `crates/attack-server/README.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use subrosa_proto::kt::directory_value;
use subrosa_proto::{
    AccountInfo, ClaimResponse, ClaimedKeyPackage, DeviceAddress, DeviceRecord, Envelope, Handle, B64,
};

use crate::kt::memory::MemoryKtStorage;
use crate::kt::{KtDirectory, KtServiceError};
use crate::{AppError, AppState};

/// The plan file's name in the data directory.
pub const PLAN_FILE: &str = "attacks.json";

/// What the operator does, as read from `attacks.json`. Every part is
/// optional; an empty object is honest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Claims for a handle return other key packages.
    #[serde(default)]
    pub substitute_key_packages: Option<Substitute>,
    /// A device the account never added is published and served.
    #[serde(default)]
    pub ghost_device: Option<Ghost>,
    /// One user is shown a forked directory.
    #[serde(default)]
    pub fork: Option<Fork>,
    /// Deliveries are dropped, replayed or reordered.
    #[serde(default)]
    pub messages: Option<Messages>,
    /// One user is shown the directory as it was when this was switched on,
    /// and nothing newer (it refuses any later epoch).
    #[serde(default)]
    pub freeze: Option<Freeze>,
    /// The answers to a handle's commits are lost after they were stored.
    #[serde(default)]
    pub lose_commit_answers: Option<LoseCommitAnswers>,
    /// A handle's commits are answered `503` before anything is stored,
    /// as if the server were overloaded.
    #[serde(default)]
    pub refuse_commits: Option<RefuseCommits>,
    /// A device the roster sent with each delivered commit names in addition
    /// (as if the server let an outsider in).
    #[serde(default)]
    pub roster_extra: Option<DeviceAddress>,
    /// Claims of a handle's post-quantum key packages are answered "no key
    /// package", to push new conversations down to the classical suite.
    #[serde(default)]
    pub withhold_post_quantum: Option<Withhold>,
    /// Blob downloads by a handle's devices are answered `503`, as if the
    /// server were overloaded (a Welcome by reference cannot be fetched).
    #[serde(default)]
    pub fail_blob_downloads: Option<FailBlobDownloads>,
}

/// `fail_blob_downloads`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailBlobDownloads {
    /// Whose downloads.
    pub handle: Handle,
}

/// `withhold_post_quantum`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withhold {
    /// Whose packages.
    pub handle: Handle,
}

/// `freeze`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    /// Requests signed by a device of this handle see the frozen directory.
    pub victim: Handle,
}

/// `refuse_commits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefuseCommits {
    /// Whose commits (sends with a commit guard): each is answered `503`
    /// and nothing of it is stored.
    pub sender: Handle,
}

/// `lose_commit_answers`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoseCommitAnswers {
    /// Whose commits (sends with a commit guard): each is stored, delivered
    /// and committed, then answered `502` as if a proxy lost the answer.
    pub sender: Handle,
}

/// `substitute_key_packages`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Substitute {
    /// Whose claims.
    pub handle: Handle,
    /// The key packages handed out instead (one claimed entry each).
    pub with: Vec<B64>,
    /// The device record they are claimed for.
    pub device: DeviceRecord,
}

/// `ghost_device`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ghost {
    /// Whose entry.
    pub handle: Handle,
    /// The device added to it.
    pub device: DeviceRecord,
}

/// `fork`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    /// Requests signed by a device of this handle see the fork.
    pub victim: Handle,
    /// The handle whose keys the fork replaces.
    pub handle: Handle,
    /// The attacker's identity key for it.
    pub identity_key: B64,
    /// The attacker's devices for it.
    pub devices: Vec<DeviceRecord>,
    /// Key packages handed out to the victim's claims, one per device in
    /// order (extra devices get none).
    #[serde(default)]
    pub key_packages: Vec<B64>,
}

/// `messages`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Messages {
    /// Only deliveries to this handle's devices (all when absent).
    #[serde(default)]
    pub recipient: Option<Handle>,
    /// Envelope ids acknowledged away undelivered.
    #[serde(default)]
    pub drop: Vec<u64>,
    /// Envelopes whose id is a multiple of this are dropped too.
    #[serde(default)]
    pub drop_every: Option<u64>,
    /// Every delivered envelope appears twice in a row.
    #[serde(default)]
    pub replay: bool,
    /// Each delivered batch is sent in reverse order.
    #[serde(default)]
    pub reorder: bool,
}

#[derive(Debug, Default)]
struct ForkState {
    /// Every real publish since the controller was installed, in order.
    history: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    /// The forked directory, once a fork was asked for.
    dir: Option<KtDirectory>,
    /// The substitution the fork holds: label and attacker value.
    substitution: Option<(Vec<u8>, Vec<u8>)>,
}

/// The controller: reads the plan, holds the fork.
#[derive(Debug)]
pub struct Attacks {
    plan_path: PathBuf,
    fork: tokio::sync::Mutex<ForkState>,
    /// The frozen copy, made when a `freeze` victim is first served.
    frozen: tokio::sync::Mutex<Option<KtDirectory>>,
}

fn fork_value(f: &Fork) -> (Vec<u8>, Vec<u8>) {
    (f.handle.as_str().as_bytes().to_vec(), directory_value(f.identity_key.as_slice(), &f.devices).to_vec())
}

impl Attacks {
    /// A controller reading `<data_dir>/attacks.json`.
    pub fn new(data_dir: &Path) -> Arc<Self> {
        Arc::new(Attacks {
            plan_path: data_dir.join(PLAN_FILE),
            fork: tokio::sync::Mutex::new(ForkState::default()),
            frozen: tokio::sync::Mutex::new(None),
        })
    }

    /// The plan now (honest when the file is missing or unreadable).
    pub fn plan(&self) -> Plan {
        let Ok(bytes) = std::fs::read(&self.plan_path) else { return Plan::default() };
        match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "attack plan unreadable; acting honestly");
                Plan::default()
            }
        }
    }

    fn active_fork(&self, viewer: Option<&DeviceAddress>) -> Option<Fork> {
        let fork = self.plan().fork?;
        (viewer?.handle == fork.victim).then_some(fork)
    }

    pub(crate) fn published_account(&self, mut info: AccountInfo) -> AccountInfo {
        if let Some(g) = self.plan().ghost_device {
            if g.handle == info.handle && !info.devices.iter().any(|d| d.device_id == g.device.device_id) {
                info.devices.push(g.device);
            }
        }
        info
    }

    pub(crate) async fn after_publish(&self, real: &KtDirectory, updates: &[(Vec<u8>, Vec<u8>)]) {
        let mut st = self.fork.lock().await;
        st.history.push(updates.to_vec());
        if st.dir.is_some() {
            let batch = substitute(updates, st.substitution.as_ref());
            if let Err(e) = publish_fork(&st, batch).await {
                tracing::warn!(error = %e, "fork publish failed");
            }
        }
        let _ = real;
    }

    /// The fork, created (replaying every real publish) and diverged (the
    /// attacker's value published in a fork-only epoch) when first needed.
    pub(crate) async fn fork_view(
        &self,
        real: &KtDirectory,
        viewer: Option<&DeviceAddress>,
    ) -> Result<Option<KtDirectory>, KtServiceError> {
        if self.plan().freeze.is_some_and(|f| viewer.is_some_and(|v| v.handle == f.victim)) {
            let mut frozen = self.frozen.lock().await;
            if frozen.is_none() {
                // A copy of every real publish so far (with the real keys,
                // so its heads are validly signed), never mirrored again.
                let st = self.fork.lock().await;
                let dir = KtDirectory::open_with_keys(
                    Arc::new(MemoryKtStorage::default()),
                    real.vrf().clone(),
                    real.signer().clone(),
                )
                .await?;
                for batch in &st.history {
                    dir.publish(batch.clone()).await?;
                }
                *frozen = Some(dir);
            }
            return Ok(frozen.clone());
        }
        let Some(fork) = self.active_fork(viewer) else { return Ok(None) };
        let mut st = self.fork.lock().await;
        if st.dir.is_none() {
            let dir = KtDirectory::open_with_keys(
                Arc::new(MemoryKtStorage::default()),
                real.vrf().clone(),
                real.signer().clone(),
            )
            .await?;
            for batch in &st.history {
                dir.publish(batch.clone()).await?;
            }
            st.dir = Some(dir);
        }
        let wanted = fork_value(&fork);
        if st.substitution.as_ref() != Some(&wanted) {
            publish_fork(&st, vec![wanted.clone()]).await?;
            st.substitution = Some(wanted);
        }
        Ok(st.dir.clone())
    }

    pub(crate) async fn forged_account(
        &self,
        view: &KtDirectory,
        viewer: Option<&DeviceAddress>,
        handle: &Handle,
    ) -> Result<Option<AccountInfo>, KtServiceError> {
        let Some(fork) = self.active_fork(viewer).filter(|f| &f.handle == handle) else { return Ok(None) };
        let kt = view.lookup(handle.as_str().as_bytes()).await?.map(|(kt, _)| kt);
        Ok(Some(AccountInfo { handle: handle.clone(), identity_key: fork.identity_key, devices: fork.devices, kt }))
    }

    pub(crate) async fn forged_claim(
        &self,
        state: &AppState,
        viewer: &DeviceAddress,
        handle: &Handle,
    ) -> Result<Option<ClaimResponse>, AppError> {
        let Some(fork) = self.active_fork(Some(viewer)).filter(|f| &f.handle == handle) else { return Ok(None) };
        let kt = state.kt().await?;
        let Some(view) = self.fork_view(kt.directory(), Some(viewer)).await? else { return Ok(None) };
        let Some(info) = self.forged_account(&view, Some(viewer), handle).await? else { return Ok(None) };
        let packages = fork
            .devices
            .iter()
            .zip(fork.key_packages.iter())
            .map(|(d, kp)| ClaimedKeyPackage { device: d.clone(), key_package: kp.clone(), last_resort: false })
            .collect();
        Ok(Some(ClaimResponse {
            handle: handle.clone(),
            identity_key: info.identity_key,
            packages,
            kt: info.kt,
            devices: info.devices,
        }))
    }

    /// Whether a claim of `handle`'s packages of `suite` is answered as if
    /// there were none (`withhold_post_quantum`: suite 65100 only).
    pub(crate) fn withholds(&self, handle: &Handle, suite: u16) -> bool {
        suite == 65100 && self.plan().withhold_post_quantum.is_some_and(|w| w.handle == *handle)
    }

    pub(crate) fn claim(&self, mut response: ClaimResponse) -> ClaimResponse {
        if let Some(s) = self.plan().substitute_key_packages.filter(|s| s.handle == response.handle) {
            response.packages = s
                .with
                .into_iter()
                .map(|kp| ClaimedKeyPackage { device: s.device.clone(), key_package: kp, last_resort: false })
                .collect();
        }
        response
    }

    /// Whether `device`'s blob download is answered `503` (`fail_blob_downloads`).
    pub(crate) fn fail_download(&self, device: &DeviceAddress) -> bool {
        self.plan().fail_blob_downloads.is_some_and(|f| f.handle == device.handle)
    }

    pub(crate) fn refuse_commit(&self, sender: &DeviceAddress, commit: bool) -> bool {
        commit && self.plan().refuse_commits.is_some_and(|l| l.sender == sender.handle)
    }

    pub(crate) fn lose_answer(&self, sender: &DeviceAddress, commit: bool) -> bool {
        commit && self.plan().lose_commit_answers.is_some_and(|l| l.sender == sender.handle)
    }

    pub(crate) fn deliver(&self, device: &DeviceAddress, messages: Vec<Envelope>) -> (Vec<Envelope>, Vec<u64>) {
        let plan = self.plan();
        let mut messages = messages;
        if let Some(extra) = &plan.roster_extra {
            for roster in messages.iter_mut().filter_map(|e| e.roster.as_mut()) {
                roster.push(extra.clone());
            }
        }
        let Some(m) = plan.messages else { return (messages, Vec::new()) };
        if m.recipient.as_ref().is_some_and(|h| h != &device.handle) {
            return (messages, Vec::new());
        }
        let mut dropped = Vec::new();
        let mut keep = Vec::new();
        for e in messages {
            let every = m.drop_every.is_some_and(|n| n > 0 && e.id % n == 0);
            if every || m.drop.contains(&e.id) {
                dropped.push(e.id);
            } else {
                keep.push(e);
            }
        }
        if m.reorder {
            keep.reverse();
        }
        if m.replay {
            keep = keep.into_iter().flat_map(|e| [e.clone(), e]).collect();
        }
        (keep, dropped)
    }
}

/// The real updates with the fork's substitution applied.
fn substitute(updates: &[(Vec<u8>, Vec<u8>)], sub: Option<&(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    updates
        .iter()
        .map(|(l, v)| match sub {
            Some((sl, sv)) if sl == l => (l.clone(), sv.clone()),
            _ => (l.clone(), v.clone()),
        })
        .collect()
}

async fn publish_fork(st: &ForkState, batch: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), crate::kt::KtError> {
    if let Some(dir) = &st.dir {
        dir.publish(batch).await?;
    }
    Ok(())
}
