//! [`KtStorage`] in memory: for tests, benchmarks and the attack server's
//! forked directory. Never the server's directory (it would not survive a
//! restart nor be shared by several nodes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::store::kt::{KtSelector, KtStorage, KtValueRow, KtWrite};
use crate::store::StoreError;

#[derive(Debug, Default)]
struct Tables {
    records: HashMap<Vec<u8>, Vec<u8>>,
    /// label → epoch → row
    values: HashMap<Vec<u8>, BTreeMap<u64, KtValueRow>>,
    epochs: BTreeMap<u64, [u8; 32]>,
    vrf: Option<[u8; 32]>,
    signing: Option<([u8; 32], [u8; 16])>,
    signed: BTreeMap<u64, Vec<u8>>,
}

/// The key-transparency tables in memory.
#[derive(Debug, Default)]
pub struct MemoryKtStorage {
    tables: Mutex<Tables>,
}

impl MemoryKtStorage {
    fn with<T>(&self, f: impl FnOnce(&mut Tables) -> T) -> T {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut t)
    }
}

#[async_trait]
impl KtStorage for MemoryKtStorage {
    async fn kt_write(&self, batch: KtWrite) -> Result<(), StoreError> {
        self.with(|t| {
            t.records.extend(batch.records);
            for v in batch.values {
                t.values.entry(v.label.clone()).or_default().insert(v.epoch, v);
            }
            if let Some((e, h)) = batch.epoch_root {
                t.epochs.insert(e, h);
            }
        });
        Ok(())
    }

    async fn kt_records(&self, keys: Vec<Vec<u8>>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        Ok(self.with(|t| keys.into_iter().filter_map(|k| t.records.get(&k).cloned().map(|v| (k, v))).collect()))
    }

    async fn kt_values(&self, label: Vec<u8>) -> Result<Vec<KtValueRow>, StoreError> {
        Ok(self.with(|t| t.values.get(&label).map(|m| m.values().cloned().collect()).unwrap_or_default()))
    }

    async fn kt_select(&self, labels: Vec<Vec<u8>>, selector: KtSelector) -> Result<Vec<KtValueRow>, StoreError> {
        Ok(self.with(|t| {
            labels
                .iter()
                .filter_map(|l| {
                    let m = t.values.get(l)?;
                    match selector {
                        KtSelector::Version(v) => m.values().find(|r| r.version == v),
                        KtSelector::Epoch(e) => m.get(&e),
                        KtSelector::AtOrBefore(e) => m.range(..=e).next_back().map(|(_, r)| r),
                        KtSelector::Newest => m.values().next_back(),
                        KtSelector::Oldest => m.values().next(),
                    }
                    .cloned()
                })
                .collect()
        }))
    }

    async fn kt_epoch_roots(&self, from: u64, to: u64) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        if to < from {
            return Ok(Vec::new());
        }
        Ok(self.with(|t| t.epochs.range(from..=to).map(|(e, h)| (*e, *h)).collect()))
    }

    async fn kt_vrf_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        Ok(self.with(|t| *t.vrf.get_or_insert(candidate)))
    }

    async fn kt_signing_key(
        &self,
        candidate: [u8; 32],
        directory_id: [u8; 16],
    ) -> Result<([u8; 32], [u8; 16]), StoreError> {
        Ok(self.with(|t| *t.signing.get_or_insert((candidate, directory_id))))
    }

    async fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with(|t| t.signed.get(&epoch).cloned()))
    }

    async fn kt_put_signed_head(&self, epoch: u64, head: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        Ok(self.with(|t| t.signed.entry(epoch).or_insert(head).clone()))
    }

    async fn kt_highest_signed(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.with(|t| t.signed.keys().next_back().copied()))
    }
}
