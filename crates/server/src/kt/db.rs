//! akd's `Database` over [`KtStorage`]: the encoding of akd's records into
//! the byte-level key-transparency tables.
//!
//! Records (`Azks`, tree nodes) are stored under akd's own binary ids in a
//! fixed binary layout, versioned by a leading format byte; value states are
//! stored as columns. A write that holds the `Azks` record of a new epoch
//! also stores that epoch's root hash, in the same transaction, for audits.

use std::collections::HashMap;
use std::sync::Arc;

use akd::errors::StorageError;
use akd::storage::types::{DbRecord, KeyData, StorageType, ValueState, ValueStateKey, ValueStateRetrievalFlag};
use akd::storage::{Database, DbSetState, Storable};
use akd::tree_node::{NodeKey, TreeNode, TreeNodeType, TreeNodeWithPreviousValue};
use akd::{AkdLabel, AkdValue, Azks, AzksValue, Configuration, NodeLabel};
use async_trait::async_trait;

use super::Tc;
use crate::store::kt::{KtSelector, KtStorage, KtValueRow, KtWrite};
use crate::store::StoreError;

/// The format byte of stored records.
const FORMAT: u8 = 1;

/// akd's storage over a [`KtStorage`] backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AkdDb {
    inner: Arc<dyn KtStorage>,
}

impl AkdDb {
    /// The akd database over these tables.
    pub fn new(inner: Arc<dyn KtStorage>) -> Self {
        AkdDb { inner }
    }

    /// The tables.
    pub fn storage(&self) -> &Arc<dyn KtStorage> {
        &self.inner
    }
}

fn storage_error(e: StoreError) -> StorageError {
    match e {
        StoreError::Unavailable(m) => StorageError::Connection(m),
        other => StorageError::Other(other.to_string()),
    }
}

fn bad(what: &str) -> StorageError {
    StorageError::Other(format!("stored key-transparency record is malformed: {what}"))
}

fn put_label(out: &mut Vec<u8>, label: &NodeLabel) {
    out.extend_from_slice(&label.label_val);
    out.extend_from_slice(&label.label_len.to_be_bytes());
}

fn put_node(out: &mut Vec<u8>, node: &TreeNode) {
    put_label(out, &node.label);
    out.extend_from_slice(&node.last_epoch.to_be_bytes());
    out.extend_from_slice(&node.min_descendant_epoch.to_be_bytes());
    put_label(out, &node.parent);
    out.push(node.node_type as u8);
    for child in [&node.left_child, &node.right_child] {
        match child {
            Some(l) => {
                out.push(1);
                put_label(out, l);
            }
            None => out.push(0),
        }
    }
    out.extend_from_slice(&node.hash.0);
}

/// Reads fixed-size fields off a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StorageError> {
        if self.0.len() < N {
            return Err(bad("too short"));
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().map_err(|_| bad("too short"))
    }
    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, StorageError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, StorageError> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn label(&mut self) -> Result<NodeLabel, StorageError> {
        let val = self.take::<32>()?;
        Ok(NodeLabel::new(val, self.u32()?))
    }
    fn opt_label(&mut self) -> Result<Option<NodeLabel>, StorageError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.label()?)),
            _ => Err(bad("child flag")),
        }
    }
    fn node(&mut self) -> Result<TreeNode, StorageError> {
        let label = self.label()?;
        let last_epoch = self.u64()?;
        let min_descendant_epoch = self.u64()?;
        let parent = self.label()?;
        let node_type = match self.u8()? {
            1 => TreeNodeType::Leaf,
            2 => TreeNodeType::Root,
            3 => TreeNodeType::Interior,
            _ => return Err(bad("node type")),
        };
        let left_child = self.opt_label()?;
        let right_child = self.opt_label()?;
        let hash = AzksValue(self.take::<32>()?);
        Ok(TreeNode { label, last_epoch, min_descendant_epoch, parent, node_type, left_child, right_child, hash })
    }
    fn end(&self) -> Result<(), StorageError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(bad("trailing bytes"))
        }
    }
}

/// Encodes an `Azks` or tree-node record; value states are not records.
fn encode(record: &DbRecord) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut out = vec![FORMAT];
    match record {
        DbRecord::Azks(azks) => {
            out.extend_from_slice(&azks.latest_epoch.to_be_bytes());
            out.extend_from_slice(&azks.num_nodes.to_be_bytes());
        }
        DbRecord::TreeNode(node) => {
            put_label(&mut out, &node.label);
            put_node(&mut out, &node.latest_node);
            match &node.previous_node {
                Some(p) => {
                    out.push(1);
                    put_node(&mut out, p);
                }
                None => out.push(0),
            }
        }
        DbRecord::ValueState(_) => return None,
    }
    Some((record.get_full_binary_id(), out))
}

fn decode(key: &[u8], value: &[u8]) -> Result<DbRecord, StorageError> {
    let mut r = Reader(value);
    if r.u8()? != FORMAT {
        return Err(bad("unknown format"));
    }
    let record = match key.first() {
        Some(k) if *k == StorageType::Azks as u8 => {
            DbRecord::Azks(Azks { latest_epoch: r.u64()?, num_nodes: r.u64()? })
        }
        Some(k) if *k == StorageType::TreeNode as u8 => {
            let label = r.label()?;
            let latest_node = r.node()?;
            let previous_node = match r.u8()? {
                0 => None,
                1 => Some(r.node()?),
                _ => return Err(bad("previous flag")),
            };
            DbRecord::TreeNode(TreeNodeWithPreviousValue { label, latest_node, previous_node })
        }
        _ => return Err(bad("unknown record kind")),
    };
    r.end()?;
    Ok(record)
}

fn to_row(state: &ValueState) -> KtValueRow {
    KtValueRow {
        label: state.username.0.clone(),
        epoch: state.epoch,
        version: state.version,
        value: state.value.0.clone(),
        node_label_val: state.label.label_val,
        node_label_len: state.label.label_len,
    }
}

fn from_row(row: KtValueRow) -> ValueState {
    DbRecord::build_user_state(row.label, row.value, row.version, row.node_label_len, row.node_label_val, row.epoch)
}

fn selector(flag: ValueStateRetrievalFlag) -> KtSelector {
    match flag {
        ValueStateRetrievalFlag::SpecificVersion(v) => KtSelector::Version(v),
        ValueStateRetrievalFlag::SpecificEpoch(e) => KtSelector::Epoch(e),
        ValueStateRetrievalFlag::LeqEpoch(e) => KtSelector::AtOrBefore(e),
        ValueStateRetrievalFlag::MaxEpoch => KtSelector::Newest,
        ValueStateRetrievalFlag::MinEpoch => KtSelector::Oldest,
    }
}

fn root_key() -> Vec<u8> {
    TreeNodeWithPreviousValue::get_full_binary_key_id(&NodeKey(NodeLabel::root()))
}

impl AkdDb {
    async fn get_record(&self, key: Vec<u8>) -> Result<Option<DbRecord>, StorageError> {
        let rows = self.inner.kt_records(vec![key]).await.map_err(storage_error)?;
        rows.into_iter().next().map(|(k, v)| decode(&k, &v)).transpose()
    }
}

#[async_trait]
impl Database for AkdDb {
    async fn set(&self, record: DbRecord) -> Result<(), StorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    async fn batch_set(&self, records: Vec<DbRecord>, _state: DbSetState) -> Result<(), StorageError> {
        let mut batch = KtWrite::default();
        let mut new_epoch = None;
        let mut root_hash = None;
        for record in &records {
            match record {
                DbRecord::ValueState(state) => batch.values.push(to_row(state)),
                DbRecord::Azks(azks) => new_epoch = Some(azks.latest_epoch),
                DbRecord::TreeNode(node) if node.label == NodeLabel::root() => {
                    root_hash = Some(Tc::compute_root_hash_from_val(&node.latest_node.hash));
                }
                DbRecord::TreeNode(_) => {}
            }
            if let Some(encoded) = encode(record) {
                batch.records.push(encoded);
            }
        }
        if let Some(epoch) = new_epoch {
            // The Azks record names the epoch this write completes; its root
            // is in the same write or (a new, empty directory) already stored.
            let hash = match root_hash {
                Some(h) => h,
                None => match self.get_record(root_key()).await? {
                    Some(DbRecord::TreeNode(root)) => Tc::compute_root_hash_from_val(&root.latest_node.hash),
                    _ => return Err(StorageError::Other("the directory has no root node".into())),
                },
            };
            batch.epoch_root = Some((epoch, hash));
        }
        self.inner.kt_write(batch).await.map_err(storage_error)
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let key = St::get_full_binary_key_id(id);
        if St::data_type() == StorageType::ValueState {
            let ValueStateKey(label, epoch) = ValueState::key_from_full_binary(&key).map_err(|e| bad(&e))?;
            let rows = self.inner.kt_select(vec![label], KtSelector::Epoch(epoch)).await.map_err(storage_error)?;
            return rows
                .into_iter()
                .next()
                .map(|r| DbRecord::ValueState(from_row(r)))
                .ok_or_else(|| StorageError::NotFound(format!("value state at epoch {epoch}")));
        }
        self.get_record(key).await?.ok_or_else(|| StorageError::NotFound(format!("{:?}", St::data_type())))
    }

    async fn batch_get<St: Storable>(&self, ids: &[St::StorageKey]) -> Result<Vec<DbRecord>, StorageError> {
        if St::data_type() == StorageType::ValueState {
            let mut out = Vec::new();
            for id in ids {
                if let Ok(r) = self.get::<St>(id).await {
                    out.push(r);
                }
            }
            return Ok(out);
        }
        let keys = ids.iter().map(St::get_full_binary_key_id).collect();
        let rows = self.inner.kt_records(keys).await.map_err(storage_error)?;
        rows.iter().map(|(k, v)| decode(k, v)).collect()
    }

    async fn get_user_data(&self, username: &AkdLabel) -> Result<KeyData, StorageError> {
        let rows = self.inner.kt_values(username.0.clone()).await.map_err(storage_error)?;
        if rows.is_empty() {
            return Err(StorageError::NotFound("no value for this label".into()));
        }
        Ok(KeyData { states: rows.into_iter().map(from_row).collect() })
    }

    async fn get_user_state(
        &self,
        username: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, StorageError> {
        let rows = self.inner.kt_select(vec![username.0.clone()], selector(flag)).await.map_err(storage_error)?;
        rows.into_iter().next().map(from_row).ok_or_else(|| StorageError::NotFound("no such value state".into()))
    }

    async fn get_user_state_versions(
        &self,
        usernames: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, StorageError> {
        let labels = usernames.iter().map(|u| u.0.clone()).collect();
        let rows = self.inner.kt_select(labels, selector(flag)).await.map_err(storage_error)?;
        Ok(rows.into_iter().map(|r| (AkdLabel(r.label), (r.version, AkdValue(r.value)))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let l = |b: u8, len: u32| NodeLabel::new([b; 32], len);
        let node = |b: u8| TreeNode {
            label: l(b, 7),
            last_epoch: 9,
            min_descendant_epoch: 3,
            parent: l(b ^ 1, 6),
            node_type: TreeNodeType::Interior,
            left_child: Some(l(2, 8)),
            right_child: None,
            hash: AzksValue([b; 32]),
        };
        let records = [
            DbRecord::Azks(Azks { latest_epoch: 5, num_nodes: 77 }),
            DbRecord::TreeNode(TreeNodeWithPreviousValue { label: l(1, 7), latest_node: node(1), previous_node: None }),
            DbRecord::TreeNode(TreeNodeWithPreviousValue {
                label: l(1, 7),
                latest_node: node(1),
                previous_node: Some(node(4)),
            }),
        ];
        for r in records {
            let (k, v) = encode(&r).expect("a record");
            assert_eq!(decode(&k, &v).expect("decodes"), r);
            assert!(decode(&k, &v[..v.len() - 1]).is_err());
        }
    }
}
