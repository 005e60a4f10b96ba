//! [`KtStorage`] for the SQLite store: the `kt_*` tables of migration 3.
//!
//! A PostgreSQL backend mirrors these statements (`BYTEA` for `BLOB`,
//! `BIGINT` for `INTEGER`, `ON CONFLICT … DO UPDATE` for `INSERT OR
//! REPLACE`, `ON CONFLICT DO NOTHING` for `INSERT OR IGNORE`).
//!
//! Reads run on the store's read-only pool (a read spanning several
//! statements in one snapshot), never behind the writer's lock, so
//! lookups and audits do not queue behind sends; writes take the write
//! connection.

use async_trait::async_trait;
use rusqlite::{params, params_from_iter, OptionalExtension, TransactionBehavior};

use super::kt::{KtSelector, KtStorage, KtValueRow, KtWrite};
use super::sqlite::{map_err, to_i64, to_u64};
use super::{SqliteStore, StoreError};

/// Keys or labels per `IN (…)` statement.
const CHUNK: usize = 500;

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

fn digest(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| StoreError::Internal(format!("stored {what} is not 32 bytes")))
}

/// A `kt_values` row as SQLite returns it (checked by [`to_value_row`]).
type RawValueRow = (Vec<u8>, i64, i64, Vec<u8>, Vec<u8>, i64);

fn value_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawValueRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
}

fn to_value_row(
    (label, epoch, version, value, node_label_val, node_label_len): RawValueRow,
) -> Result<KtValueRow, StoreError> {
    Ok(KtValueRow {
        label,
        epoch: to_u64(epoch),
        version: to_u64(version),
        value,
        node_label_val: digest(node_label_val, "tree label")?,
        node_label_len: u32::try_from(node_label_len)
            .map_err(|_| StoreError::Internal("stored tree label length is out of range".into()))?,
    })
}

const VALUE_COLUMNS: &str = "label, epoch, version, value, node_label_val, node_label_len";

#[async_trait]
impl KtStorage for SqliteStore {
    async fn kt_write(&self, batch: KtWrite) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
            {
                let mut put = tx
                    .prepare_cached("INSERT OR REPLACE INTO kt_records (key, value) VALUES (?1, ?2)")
                    .map_err(map_err)?;
                for (key, value) in &batch.records {
                    put.execute(params![key, value]).map_err(map_err)?;
                }
                let mut val = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO kt_values (label, epoch, version, value, node_label_val, node_label_len)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(map_err)?;
                for v in &batch.values {
                    val.execute(params![
                        v.label,
                        to_i64(v.epoch),
                        to_i64(v.version),
                        v.value,
                        &v.node_label_val[..],
                        i64::from(v.node_label_len)
                    ])
                    .map_err(map_err)?;
                }
                if let Some((epoch, root)) = batch.epoch_root {
                    tx.execute(
                        "INSERT OR REPLACE INTO kt_epochs (epoch, root_hash) VALUES (?1, ?2)",
                        params![to_i64(epoch), &root[..]],
                    )
                    .map_err(map_err)?;
                }
            }
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn kt_records(&self, keys: Vec<Vec<u8>>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.read(move |conn| {
            // One snapshot across the chunks, whatever a publish commits meanwhile.
            let snapshot = conn.unchecked_transaction().map_err(map_err)?;
            let conn: &rusqlite::Connection = &snapshot;
            let mut out = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(CHUNK) {
                let sql = format!("SELECT key, value FROM kt_records WHERE key IN ({})", placeholders(chunk.len()));
                let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
                let rows =
                    stmt.query_map(params_from_iter(chunk.iter()), |r| Ok((r.get(0)?, r.get(1)?))).map_err(map_err)?;
                for row in rows {
                    out.push(row.map_err(map_err)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn kt_values(&self, label: Vec<u8>) -> Result<Vec<KtValueRow>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {VALUE_COLUMNS} FROM kt_values WHERE label = ?1 ORDER BY epoch"))
                .map_err(map_err)?;
            let rows = stmt.query_map([&label], value_row).map_err(map_err)?;
            rows.map(|r| to_value_row(r.map_err(map_err)?)).collect()
        })
        .await
    }

    async fn kt_select(&self, labels: Vec<Vec<u8>>, selector: KtSelector) -> Result<Vec<KtValueRow>, StoreError> {
        self.read(move |conn| {
            // One snapshot across the chunks, whatever a publish commits meanwhile.
            let snapshot = conn.unchecked_transaction().map_err(map_err)?;
            let conn: &rusqlite::Connection = &snapshot;
            let (condition, order, arg) = match selector {
                KtSelector::Version(v) => ("AND version = ?", "", Some(v)),
                KtSelector::Epoch(e) => ("AND epoch = ?", "", Some(e)),
                KtSelector::AtOrBefore(e) => ("AND epoch <= ?", "ORDER BY label, epoch DESC", Some(e)),
                KtSelector::Newest => ("", "ORDER BY label, epoch DESC", None),
                KtSelector::Oldest => ("", "ORDER BY label, epoch ASC", None),
            };
            let mut out: Vec<KtValueRow> = Vec::new();
            for chunk in labels.chunks(CHUNK) {
                let sql = format!(
                    "SELECT {VALUE_COLUMNS} FROM kt_values WHERE label IN ({}) {condition} {order}",
                    placeholders(chunk.len())
                );
                let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
                let mut args: Vec<rusqlite::types::Value> =
                    chunk.iter().map(|l| rusqlite::types::Value::Blob(l.clone())).collect();
                if let Some(a) = arg {
                    args.push(rusqlite::types::Value::Integer(to_i64(a)));
                }
                let rows = stmt.query_map(params_from_iter(args.iter()), value_row).map_err(map_err)?;
                for row in rows {
                    let row = to_value_row(row.map_err(map_err)?)?;
                    // Ordered by label, best first: keep the first row per label.
                    if out.last().is_some_and(|last| last.label == row.label) {
                        continue;
                    }
                    out.push(row);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn kt_epoch_roots(&self, from: u64, to: u64) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT epoch, root_hash FROM kt_epochs WHERE epoch >= ?1 AND epoch <= ?2 ORDER BY epoch",
                )
                .map_err(map_err)?;
            let rows = stmt
                .query_map(params![to_i64(from), to_i64(to)], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
                .map_err(map_err)?;
            rows.map(|r| {
                let (epoch, hash) = r.map_err(map_err)?;
                Ok((to_u64(epoch), digest(hash, "root hash")?))
            })
            .collect()
        })
        .await
    }

    async fn kt_vrf_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
            tx.execute("INSERT OR IGNORE INTO kt_vrf (id, private_key) VALUES (1, ?1)", [&candidate[..]])
                .map_err(map_err)?;
            let key: Option<Vec<u8>> = tx
                .query_row("SELECT private_key FROM kt_vrf WHERE id = 1", [], |r| r.get(0))
                .optional()
                .map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            digest(key.ok_or_else(|| StoreError::Internal("the VRF key row is missing".into()))?, "VRF key")
        })
        .await
    }

    async fn kt_signing_key(
        &self,
        candidate: [u8; 32],
        directory_id: [u8; 16],
    ) -> Result<([u8; 32], [u8; 16]), StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
            tx.execute(
                "INSERT OR IGNORE INTO kt_signing (id, private_key, directory_id) VALUES (1, ?1, ?2)",
                params![&candidate[..], &directory_id[..]],
            )
            .map_err(map_err)?;
            let row: Option<(Vec<u8>, Vec<u8>)> = tx
                .query_row("SELECT private_key, directory_id FROM kt_signing WHERE id = 1", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            let (key, id) = row.ok_or_else(|| StoreError::Internal("the head-signing key row is missing".into()))?;
            let id = <[u8; 16]>::try_from(id.as_slice())
                .map_err(|_| StoreError::Internal("the directory id is not 16 bytes".into()))?;
            Ok((digest(key, "head-signing key")?, id))
        })
        .await
    }

    async fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(move |conn| {
            conn.query_row("SELECT head FROM kt_signed_heads WHERE epoch = ?1", [to_i64(epoch)], |r| r.get(0))
                .optional()
                .map_err(map_err)
        })
        .await
    }

    async fn kt_put_signed_head(&self, epoch: u64, head: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
            tx.execute(
                "INSERT OR IGNORE INTO kt_signed_heads (epoch, head) VALUES (?1, ?2)",
                params![to_i64(epoch), head],
            )
            .map_err(map_err)?;
            let stored: Vec<u8> = tx
                .query_row("SELECT head FROM kt_signed_heads WHERE epoch = ?1", [to_i64(epoch)], |r| r.get(0))
                .map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            Ok(stored)
        })
        .await
    }

    async fn kt_highest_signed(&self) -> Result<Option<u64>, StoreError> {
        self.read(move |conn| {
            let max: Option<i64> =
                conn.query_row("SELECT MAX(epoch) FROM kt_signed_heads", [], |r| r.get(0)).map_err(map_err)?;
            Ok(max.map(to_u64))
        })
        .await
    }
}
