//! Attachment blobs on the server: a resumable upload of a staged (sealed)
//! blob file, and a resumable download into a local file. Both pick up
//! where the server, or the local file, says they stopped.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use reqwest::Method;
use subrosa_proto::limits::MAX_BLOB_PIECE_BYTES;
use subrosa_proto::{BlobCreate, BlobCreated, BlobFetched, BlobId, BlobStatus, DeviceAddress, Empty, ErrorCode};

use crate::net::Api;
use crate::ClientError;

/// Bytes per upload request and per download request.
pub const PIECE: usize = MAX_BLOB_PIECE_BYTES;

fn io(what: &str, path: &Path, e: &std::io::Error) -> ClientError {
    ClientError::Io(format!("{what} {}: {e}", path.display()))
}

impl Api {
    /// Opens an upload of `size` bytes that `readers` may download, gone
    /// at `expires_at` (ms since the Unix epoch) when its message
    /// disappears then.
    ///
    /// # Errors
    /// The server's refusal (`blob_too_large`, `blob_quota_exceeded`…), or
    /// [`ClientError::Network`].
    pub async fn blob_create(
        &self,
        size: u64,
        readers: Vec<DeviceAddress>,
        expires_at: Option<u64>,
    ) -> Result<BlobCreated, ClientError> {
        self.call(Method::POST, "/v1/blobs", Some(&BlobCreate { size, readers, expires_at })).await
    }

    /// Where an upload stands.
    ///
    /// # Errors
    /// As [`Api::blob_create`].
    pub async fn blob_status(&self, blob: &BlobId) -> Result<BlobStatus, ClientError> {
        self.call::<Empty, _>(Method::GET, &format!("/v1/blobs/{blob}/status"), None).await
    }

    /// Appends one piece at `offset`.
    ///
    /// # Errors
    /// As [`Api::blob_create`]; `blob_offset` when the upload stands elsewhere.
    pub async fn blob_append(&self, blob: &BlobId, offset: u64, piece: Vec<u8>) -> Result<BlobStatus, ClientError> {
        self.call_raw(Method::PUT, &format!("/v1/blobs/{blob}?offset={offset}"), piece).await
    }

    /// Finishes an upload.
    ///
    /// # Errors
    /// As [`Api::blob_create`].
    pub async fn blob_finish(&self, blob: &BlobId) -> Result<BlobStatus, ClientError> {
        self.call(Method::POST, &format!("/v1/blobs/{blob}/finish"), Some(&Empty {})).await
    }

    /// Up to [`PIECE`] bytes of a blob from `offset`.
    ///
    /// # Errors
    /// As [`Api::blob_create`].
    pub async fn blob_download(&self, blob: &BlobId, offset: u64) -> Result<Vec<u8>, ClientError> {
        self.call_bytes(Method::GET, &format!("/v1/blobs/{blob}?offset={offset}&length={PIECE}"), PIECE).await
    }

    /// Says this device fetched the blob whole.
    ///
    /// # Errors
    /// As [`Api::blob_create`].
    pub async fn blob_fetched(&self, blob: &BlobId) -> Result<BlobFetched, ClientError> {
        self.call(Method::POST, &format!("/v1/blobs/{blob}/fetched"), Some(&Empty {})).await
    }
}

/// Uploads the staged blob file at `staged` (already sealed) to `blob`,
/// from wherever the server says the upload stands, and finishes it.
/// `progress` hears the bytes the server holds.
///
/// # Errors
/// The server's refusals, network failures (the upload resumes later from
/// where it stopped), [`ClientError::Io`] for the staged file.
pub async fn upload(
    api: &Api,
    blob: &BlobId,
    staged: &Path,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ClientError> {
    let mut file = std::fs::File::open(staged).map_err(|e| io("cannot open the staged attachment", staged, &e))?;
    let len = file.metadata().map_err(|e| io("cannot read", staged, &e))?.len();
    let mut status = api.blob_status(blob).await?;
    if status.size != len {
        return Err(ClientError::Protocol(format!(
            "the server holds an upload of {} bytes for a blob of {len}",
            status.size
        )));
    }
    let mut buf = vec![0u8; PIECE];
    while status.received < status.size {
        progress(status.received);
        file.seek(SeekFrom::Start(status.received)).map_err(|e| io("cannot read", staged, &e))?;
        let want = usize::try_from((status.size - status.received).min(PIECE as u64))
            .map_err(|_| ClientError::Bug("piece size".into()))?;
        file.read_exact(&mut buf[..want]).map_err(|e| io("cannot read", staged, &e))?;
        status = match api.blob_append(blob, status.received, buf[..want].to_vec()).await {
            Ok(s) => s,
            // A piece whose answer was lost landed already: ask where it stands.
            Err(e) if e.code() == Some(ErrorCode::BlobOffset) => api.blob_status(blob).await?,
            Err(e) => return Err(e),
        };
    }
    progress(status.received);
    if !status.complete {
        api.blob_finish(blob).await?;
    }
    Ok(())
}

/// Downloads `blob` (exactly `len` bytes) into `partial`, appending to
/// what an interrupted download left there. `progress` hears the bytes held.
///
/// # Errors
/// The server's refusals, network failures (the download resumes later),
/// [`ClientError::Protocol`] when the server sends more or fewer bytes than
/// `len`, [`ClientError::Io`].
pub async fn download(
    api: &Api,
    blob: &BlobId,
    len: u64,
    partial: &Path,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ClientError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .map_err(|e| io("cannot write", partial, &e))?;
    let mut have = file.metadata().map_err(|e| io("cannot read", partial, &e))?.len();
    if have > len {
        // Not ours to trust: start again.
        file.set_len(0).map_err(|e| io("cannot write", partial, &e))?;
        have = 0;
    }
    while have < len {
        progress(have);
        let piece = api.blob_download(blob, have).await?;
        if piece.is_empty() {
            return Err(ClientError::Protocol(format!("the server's attachment ends at byte {have} of {len}")));
        }
        let piece = &piece[..piece.len().min(usize::try_from(len - have).unwrap_or(usize::MAX))];
        file.write_all(piece).map_err(|e| io("cannot write", partial, &e))?;
        have += piece.len() as u64;
    }
    file.sync_all().map_err(|e| io("cannot write", partial, &e))?;
    progress(have);
    Ok(())
}
