//! [`KtStorage`] for the PostgreSQL store: the `kt_*` tables of migration 2,
//! the same statements as the SQLite backend's in PostgreSQL's dialect.

use async_trait::async_trait;
use tokio_postgres::types::ToSql;

use super::super::kt::{KtPublishLock, KtSelector, KtStorage, KtValueRow, KtWrite};
use super::*;

fn digest(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| StoreError::Internal(format!("stored {what} is not 32 bytes")))
}

fn value_row(r: &Row) -> Result<KtValueRow, StoreError> {
    Ok(KtValueRow {
        label: r.get(0),
        epoch: to_u64(r.get(1)),
        version: to_u64(r.get(2)),
        value: r.get(3),
        node_label_val: digest(r.get(4), "tree label")?,
        node_label_len: u32::try_from(r.get::<_, i64>(5))
            .map_err(|_| StoreError::Internal("stored tree label length is out of range".into()))?,
    })
}

const VALUE_COLUMNS: &str = "label, epoch, version, value, node_label_val, node_label_len";

/// First key of the advisory lock a publishing node holds (the second is
/// the schema's name hashed, as for migrations).
const PUBLISH_LOCK: i32 = 0x5342_4b54; // "SBKT"

/// A session-level advisory lock on a pooled connection. Released on drop:
/// unlocked in the background, or, outside a runtime, by closing the
/// connection (which ends the session and its locks).
struct HeldLock(Option<deadpool_postgres::Object>);

impl Drop for HeldLock {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if client
                        .execute(
                            "SELECT pg_advisory_unlock($1, hashtext(COALESCE(current_schema(), '')))",
                            &[&PUBLISH_LOCK],
                        )
                        .await
                        .is_err()
                    {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

#[async_trait]
impl KtStorage for PgStore {
    async fn kt_publish_lock(&self) -> Result<Option<KtPublishLock>, StoreError> {
        let work = async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .execute("SELECT pg_advisory_lock($1, hashtext(COALESCE(current_schema(), '')))", &[&PUBLISH_LOCK])
                .await
                .map_err(|e| db_error(&e))?;
            Ok(Some(KtPublishLock(Box::new(HeldLock(Some(client))))))
        };
        match tokio::time::timeout(OP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("waiting for the directory's publish lock timed out".into())),
        }
    }

    async fn kt_write(&self, batch: KtWrite) -> Result<(), StoreError> {
        in_tx!(self, |tx| {
            async {
            // One statement per table: arrays unnested server-side.
            if !batch.records.is_empty() {
                let keys: Vec<&[u8]> = batch.records.iter().map(|(k, _)| k.as_slice()).collect();
                let values: Vec<&[u8]> = batch.records.iter().map(|(_, v)| v.as_slice()).collect();
                execute(
                    &tx,
                    "INSERT INTO kt_records (key, value) SELECT * FROM UNNEST($1::bytea[], $2::bytea[])
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&keys, &values],
                )
                .await?;
            }
            if !batch.values.is_empty() {
                let v = &batch.values;
                let labels: Vec<&[u8]> = v.iter().map(|r| r.label.as_slice()).collect();
                let epochs: Vec<i64> = v.iter().map(|r| to_i64(r.epoch)).collect();
                let versions: Vec<i64> = v.iter().map(|r| to_i64(r.version)).collect();
                let vals: Vec<&[u8]> = v.iter().map(|r| r.value.as_slice()).collect();
                let node_vals: Vec<&[u8]> = v.iter().map(|r| &r.node_label_val[..]).collect();
                let node_lens: Vec<i64> = v.iter().map(|r| i64::from(r.node_label_len)).collect();
                let params: [&(dyn ToSql + Sync); 6] = [&labels, &epochs, &versions, &vals, &node_vals, &node_lens];
                execute(
                    &tx,
                    "INSERT INTO kt_values (label, epoch, version, value, node_label_val, node_label_len)
                     SELECT * FROM UNNEST($1::bytea[], $2::bigint[], $3::bigint[], $4::bytea[], $5::bytea[], $6::bigint[])
                     ON CONFLICT (label, epoch) DO UPDATE SET version = excluded.version, value = excluded.value,
                        node_label_val = excluded.node_label_val, node_label_len = excluded.node_label_len",
                    &params,
                )
                .await?;
            }
            if let Some((epoch, root)) = batch.epoch_root {
                execute(
                    &tx,
                    "INSERT INTO kt_epochs (epoch, root_hash) VALUES ($1, $2)
                     ON CONFLICT (epoch) DO UPDATE SET root_hash = excluded.root_hash",
                    &[&to_i64(epoch), &&root[..]],
                )
                .await?;
            }
            Ok(())
        }
        .await
        })
    }

    async fn kt_records(&self, keys: Vec<Vec<u8>>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        on_client!(self, |c| async {
            let rows = query(&c, "SELECT key, value FROM kt_records WHERE key = ANY($1)", &[&keys]).await?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        }
        .await)
    }

    async fn kt_values(&self, label: Vec<u8>) -> Result<Vec<KtValueRow>, StoreError> {
        on_client!(self, |c| async {
            let sql = format!("SELECT {VALUE_COLUMNS} FROM kt_values WHERE label = $1 ORDER BY epoch");
            let rows = query(&c, &sql, &[&label]).await?;
            Ok(rows.iter().map(value_row).collect::<Result<Vec<_>, _>>()?)
        }
        .await)
    }

    async fn kt_select(&self, labels: Vec<Vec<u8>>, selector: KtSelector) -> Result<Vec<KtValueRow>, StoreError> {
        let (condition, order, arg) = match selector {
            KtSelector::Version(v) => ("AND version = $2", "ORDER BY label", Some(v)),
            KtSelector::Epoch(e) => ("AND epoch = $2", "ORDER BY label", Some(e)),
            KtSelector::AtOrBefore(e) => ("AND epoch <= $2", "ORDER BY label, epoch DESC", Some(e)),
            KtSelector::Newest => ("", "ORDER BY label, epoch DESC", None),
            KtSelector::Oldest => ("", "ORDER BY label, epoch ASC", None),
        };
        // The best row per label: the first in the order above.
        let sql = format!(
            "SELECT DISTINCT ON (label) {VALUE_COLUMNS} FROM kt_values WHERE label = ANY($1) {condition} {order}"
        );
        on_client!(self, |c| async {
            let rows = match arg {
                Some(a) => query(&c, &sql, &[&labels, &to_i64(a)]).await?,
                None => query(&c, &sql, &[&labels]).await?,
            };
            Ok(rows.iter().map(value_row).collect::<Result<Vec<_>, _>>()?)
        }
        .await)
    }

    async fn kt_epoch_roots(&self, from: u64, to: u64) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        on_client!(self, |c| async {
            let rows = query(
                &c,
                "SELECT epoch, root_hash FROM kt_epochs WHERE epoch >= $1 AND epoch <= $2 ORDER BY epoch",
                &[&to_i64(from), &to_i64(to)],
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| Ok((to_u64(r.get(0)), digest(r.get(1), "root hash")?)))
                .collect::<Result<Vec<_>, StoreError>>()?)
        }
        .await)
    }

    async fn kt_vrf_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        in_tx!(self, |tx| async {
            execute(
                &tx,
                "INSERT INTO kt_vrf (id, private_key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&&candidate[..]],
            )
            .await?;
            let row = query_opt(&tx, "SELECT private_key FROM kt_vrf WHERE id = 1", &[]).await?;
            let key: Vec<u8> =
                row.map(|r| r.get(0)).ok_or_else(|| StoreError::Internal("the VRF key row is missing".into()))?;
            Ok(digest(key, "VRF key")?)
        }
        .await)
    }

    async fn kt_signing_key(
        &self,
        candidate: [u8; 32],
        directory_id: [u8; 16],
    ) -> Result<([u8; 32], [u8; 16]), StoreError> {
        in_tx!(self, |tx| async {
            execute(
                &tx,
                "INSERT INTO kt_signing (id, private_key, directory_id) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                &[&&candidate[..], &&directory_id[..]],
            )
            .await?;
            let row = query_opt(&tx, "SELECT private_key, directory_id FROM kt_signing WHERE id = 1", &[]).await?;
            let (key, id): (Vec<u8>, Vec<u8>) = row
                .map(|r| (r.get(0), r.get(1)))
                .ok_or_else(|| StoreError::Internal("the head-signing key row is missing".into()))?;
            let id = <[u8; 16]>::try_from(id.as_slice())
                .map_err(|_| StoreError::Internal("the directory id is not 16 bytes".into()))?;
            Ok((digest(key, "head-signing key")?, id))
        }
        .await)
    }

    async fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, StoreError> {
        on_client!(self, |c| async {
            let row = query_opt(&c, "SELECT head FROM kt_signed_heads WHERE epoch = $1", &[&to_i64(epoch)]).await?;
            Ok(row.map(|r| r.get(0)))
        }
        .await)
    }

    async fn kt_put_signed_head(&self, epoch: u64, head: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        in_tx!(self, |tx| async {
            execute(
                &tx,
                "INSERT INTO kt_signed_heads (epoch, head) VALUES ($1, $2) ON CONFLICT (epoch) DO NOTHING",
                &[&to_i64(epoch), &head],
            )
            .await?;
            let row = query_opt(&tx, "SELECT head FROM kt_signed_heads WHERE epoch = $1", &[&to_i64(epoch)]).await?;
            let head: Vec<u8> =
                row.map(|r| r.get(0)).ok_or_else(|| StoreError::Internal("the signed head row is missing".into()))?;
            Ok(head)
        }
        .await)
    }

    async fn kt_highest_signed(&self) -> Result<Option<u64>, StoreError> {
        on_client!(self, |c| async {
            let row = query_opt(&c, "SELECT MAX(epoch) FROM kt_signed_heads", &[]).await?;
            Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)).map(to_u64))
        }
        .await)
    }
}
