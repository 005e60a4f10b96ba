//! The few points where the malicious-operator controller of test builds
//! (`crate::attacks`, feature `test-attacks`) may change an answer. Without
//! that feature, or with no controller installed in the state, each is the
//! identity.

use async_trait::async_trait;
use subrosa_proto::{AccountInfo, ClaimResponse, DeviceAddress, Envelope, Handle};

use crate::kt::{KtDirectory, KtServiceError, KtSource};
use crate::store::StoreError;
use crate::{AppError, AppState};

/// What the key directory's service reads through the web layer's state:
/// the store's accounts, and the controller's substitutions when one is
/// installed.
pub(crate) struct Source<'a>(pub &'a AppState);

#[async_trait]
impl KtSource for Source<'_> {
    async fn account(&self, handle: &Handle) -> Result<Option<AccountInfo>, StoreError> {
        self.0.store.account(handle).await
    }

    fn published_account(&self, info: AccountInfo) -> AccountInfo {
        #[cfg(feature = "test-attacks")]
        if let Some(a) = &self.0.attacks {
            return a.published_account(info);
        }
        info
    }

    async fn after_publish(&self, dir: &KtDirectory, updates: &[(Vec<u8>, Vec<u8>)]) {
        #[cfg(feature = "test-attacks")]
        if let Some(a) = &self.0.attacks {
            a.after_publish(dir, updates).await;
        }
        let _ = (dir, updates);
    }

    async fn view(
        &self,
        real: &KtDirectory,
        viewer: Option<&DeviceAddress>,
    ) -> Result<Option<KtDirectory>, KtServiceError> {
        #[cfg(feature = "test-attacks")]
        if let Some(a) = &self.0.attacks {
            return a.fork_view(real, viewer).await;
        }
        let _ = (real, viewer);
        Ok(None)
    }

    async fn forged_account(
        &self,
        view: &KtDirectory,
        viewer: Option<&DeviceAddress>,
        handle: &Handle,
    ) -> Result<Option<AccountInfo>, KtServiceError> {
        #[cfg(feature = "test-attacks")]
        if let Some(a) = &self.0.attacks {
            return a.forged_account(view, viewer, handle).await;
        }
        let _ = (view, viewer, handle);
        Ok(None)
    }
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

/// Whether a claim of `handle`'s key packages of `suite` is answered "no
/// key package" whatever is stored (post-quantum packages withheld).
pub(crate) fn withholds(state: &AppState, handle: &Handle, suite: u16) -> bool {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.withholds(handle, suite);
    }
    let _ = (state, handle, suite);
    false
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

/// Whether a send is answered "unavailable" before anything is stored.
pub(crate) fn refuse_send(state: &AppState, sender: &DeviceAddress, commit: bool) -> bool {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.refuse_commit(sender, commit);
    }
    let _ = (state, sender, commit);
    false
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

/// Whether `device`'s blob download is answered "unavailable" whatever is
/// stored.
pub(crate) fn fail_download(state: &AppState, device: &DeviceAddress) -> bool {
    #[cfg(feature = "test-attacks")]
    if let Some(a) = &state.attacks {
        return a.fail_download(device);
    }
    let _ = (state, device);
    false
}
