//! The few points where the malicious-operator controller of test builds
//! (`crate::attacks`, feature `test-attacks`) may change an answer. Without
//! that feature, or with no controller installed in the state, each is the
//! identity.

use subrosa_proto::{AccountInfo, ClaimResponse, DeviceAddress, Envelope, Handle};

use crate::kt::{KtDirectory, KtService};
use crate::{AppError, AppState};

/// The account as the directory publishes it (a ghost device added).
pub(crate) fn published_account(state: &AppState, info: AccountInfo) -> AccountInfo {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.published_account(info);
    }
    let _ = state;
    info
}

/// After a real epoch was published with these updates.
pub(crate) async fn after_publish(state: &AppState, dir: &KtDirectory, updates: &[(Vec<u8>, Vec<u8>)]) {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        a.after_publish(dir, updates).await;
    }
    let _ = (state, dir, updates);
}

/// The directory `viewer` is shown (a fork for an attack's victim).
pub(crate) async fn view(
    state: &AppState,
    service: &KtService,
    viewer: Option<&DeviceAddress>,
) -> Result<KtDirectory, AppError> {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        if let Some(fork) = a.fork_view(service.directory(), viewer).await? {
            return Ok(fork);
        }
    }
    let _ = (state, viewer);
    Ok(service.directory().clone())
}

/// The attacker's account answer for `handle`, when `viewer` is shown a
/// forged one.
pub(crate) async fn forged_account(
    state: &AppState,
    view: &KtDirectory,
    viewer: Option<&DeviceAddress>,
    handle: &Handle,
) -> Result<Option<AccountInfo>, AppError> {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.forged_account(view, viewer, handle).await;
    }
    let _ = (state, view, viewer, handle);
    Ok(None)
}

/// The attacker's claim answer, when `viewer` is shown a forged one (no
/// real key package is consumed).
pub(crate) async fn forged_claim(
    state: &AppState,
    viewer: &DeviceAddress,
    handle: &Handle,
) -> Result<Option<ClaimResponse>, AppError> {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.forged_claim(state, viewer, handle).await;
    }
    let _ = (state, viewer, handle);
    Ok(None)
}

/// A claim answer about to be sent (key packages substituted).
pub(crate) fn claim(state: &AppState, response: ClaimResponse) -> ClaimResponse {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.claim(response);
    }
    let _ = state;
    response
}

/// Envelopes about to be delivered to `device` (HTTP fetch or WebSocket
/// push): what to deliver, and the ids to acknowledge away undelivered.
pub(crate) fn deliver(state: &AppState, device: &DeviceAddress, messages: Vec<Envelope>) -> (Vec<Envelope>, Vec<u64>) {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.deliver(device, messages);
    }
    let _ = (state, device);
    (messages, Vec::new())
}

/// Whether the answer to a stored send is thrown away (a lost answer).
pub(crate) fn lose_answer(state: &AppState, sender: &DeviceAddress, commit: bool) -> bool {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.lose_answer(sender, commit);
    }
    let _ = (state, sender, commit);
    false
}
