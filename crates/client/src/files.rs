//! Attachments on this device: sealing a file to send, uploading it for the
//! conversation's member devices, and for received ones downloading,
//! checking and keeping the sealed blob in the home directory, and saving
//! the plaintext only where the user asks.
//!
//! Files live in `HOME/attachments/`: `out-ID.blob` (a sealed file being
//! sent; removed once the message is sent), `BLOB.part` (a download in
//! progress, resumed from its length) and `BLOB.blob` (a received blob,
//! checked; the key is in the encrypted store). Plaintext is never written
//! there.

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use subrosa_core::attachment::AttachedFile;
use subrosa_proto::{BlobId, ConversationId};
use zeroize::Zeroizing;

use crate::attachment::{self, AttachmentError, AttachmentKey};
use crate::store::{AttachmentRow, AttachmentState};
use crate::{ClientError, Subrosa};

/// The attachment folder of a home directory.
pub fn folder(home: &Path) -> PathBuf {
    home.join("attachments")
}

fn io(what: &str, path: &Path, e: &std::io::Error) -> ClientError {
    ClientError::Io(format!("{what} {}: {e}", path.display()))
}

fn ensure_folder(home: &Path) -> Result<PathBuf, ClientError> {
    let dir = folder(home);
    std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, &e))?;
    Ok(dir)
}

/// A file sealed and staged for sending (its blob not uploaded yet).
#[derive(Debug)]
pub struct Staged {
    /// The pointer to put in the message once uploaded (its blob id is
    /// filled in by [`Subrosa::upload_staged`]).
    pub file: AttachedFile,
    /// The sealed blob.
    pub path: PathBuf,
    /// Its length.
    pub blob_len: u64,
    /// Kept when dropped: its upload may resume later.
    pub keep: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Ciphertext only, but of no use once sent or abandoned.
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An upload this device started and did not send yet, kept in the
/// encrypted store (`meta`) so that sending the same file to the same
/// conversation again resumes it: the same sealed blob (never sealed twice
/// under one key), the same blob on the server, from where it stopped.
#[derive(serde::Serialize, serde::Deserialize)]
struct Unsent {
    staged: String,
    key: String,
    sha256: String,
    size: u64,
    name: String,
    media_type: String,
    blob: Option<String>,
}

/// The `meta` key of the upload of `path` (as it is now) to `conversation`.
fn unsent_key(conversation: &ConversationId, path: &Path) -> Result<String, ClientError> {
    use sha2::Digest as _;
    let unreadable = |e: std::io::Error| ClientError::Input(format!("cannot read {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    let full = std::fs::canonicalize(path).map_err(unreadable)?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    let mut h = sha2::Sha256::new();
    h.update(conversation.0);
    h.update(full.to_string_lossy().as_bytes());
    h.update(meta.len().to_be_bytes());
    h.update(mtime.as_nanos().to_be_bytes());
    Ok(format!("upload/{}", hex::encode(h.finalize())))
}

impl Unsent {
    fn of(s: &Staged, blob: Option<&BlobId>) -> Self {
        Unsent {
            staged: s.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            key: hex::encode(*s.file.key),
            sha256: hex::encode(s.file.sha256),
            size: s.file.size,
            name: s.file.name.clone(),
            media_type: s.file.media_type.clone(),
            blob: blob.map(BlobId::to_hex),
        }
    }

    /// A copy (the key zeroized on drop of each).
    fn of_parts(u: &Unsent) -> Self {
        Unsent {
            staged: u.staged.clone(),
            key: u.key.clone(),
            sha256: u.sha256.clone(),
            size: u.size,
            name: u.name.clone(),
            media_type: u.media_type.clone(),
            blob: u.blob.clone(),
        }
    }

    fn bytes(&self) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        serde_json::to_vec(self).map(Zeroizing::new).map_err(|e| ClientError::Bug(e.to_string()))
    }

    /// The staged upload again, when its sealed blob is still whole.
    fn resume(&self, home: &Path) -> Option<(Staged, Option<BlobId>)> {
        let path = folder(home).join(&self.staged);
        let blob_len = attachment::blob_len(self.size);
        if std::fs::metadata(&path).ok()?.len() != blob_len {
            return None;
        }
        let raw = Zeroizing::new(hex::decode(&self.key).ok()?);
        let key = Zeroizing::new(<[u8; 32]>::try_from(raw.as_slice()).ok()?);
        let sha256 = <[u8; 32]>::try_from(hex::decode(&self.sha256).ok()?.as_slice()).ok()?;
        let blob = match &self.blob {
            Some(b) => Some(b.parse().ok()?),
            None => None,
        };
        let file = AttachedFile {
            blob: [0; 16],
            key,
            sha256,
            size: self.size,
            name: self.name.clone(),
            media_type: self.media_type.clone(),
        };
        Some((Staged { file, path, blob_len, keep: true }, blob))
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// A guess of the media type from the name's extension; the recipient
/// never acts on it.
fn media_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" => "text/plain",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "zip" => "application/zip",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// Seals the file at `path` under a fresh key into the home's attachment
/// folder. `progress` hears the bytes sealed.
///
/// # Errors
/// [`ClientError::Input`] for a file that cannot be read or is not a
/// regular file; [`ClientError::Io`].
pub fn stage(home: &Path, path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Staged, ClientError> {
    let meta =
        std::fs::metadata(path).map_err(|e| ClientError::Input(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ClientError::Input(format!("{} is not a file", path.display())));
    }
    let size = meta.len();
    if size > subrosa_core::attachment::MAX_FILE_BYTES {
        return Err(ClientError::Input(format!("{} is too large to attach", path.display())));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.chars().take(subrosa_core::attachment::MAX_NAME_BYTES / 4).collect::<String>())
        .unwrap_or_else(|| "attachment".to_owned());
    let dir = ensure_folder(home)?;
    let staged = dir.join(format!("out-{}.blob", hex::encode(rand::random::<[u8; 16]>())));
    let key = AttachmentKey::random();
    let src =
        std::fs::File::open(path).map_err(|e| ClientError::Input(format!("cannot read {}: {e}", path.display())))?;
    let dst = std::fs::File::create_new(&staged).map_err(|e| io("cannot create", &staged, &e))?;
    let mut out = Staged {
        file: AttachedFile {
            blob: [0; 16],
            key: Zeroizing::new(*key.as_bytes()),
            sha256: [0; 32],
            size,
            media_type: media_type(&name).to_owned(),
            name,
        },
        path: staged,
        blob_len: attachment::blob_len(size),
        keep: false,
    };
    let mut writer = BufWriter::new(dst);
    let digest = attachment::seal(&key, size, &mut BufReader::new(src), &mut writer, &mut |done| progress(done, size))
        .map_err(|e| match e {
            AttachmentError::Io(e) => io("cannot seal", path, &e),
            e => ClientError::Input(format!("{}: {e}", path.display())),
        })?;
    let file = writer.into_inner().map_err(|e| io("cannot write", &out.path, e.error()))?;
    file.sync_all().map_err(|e| io("cannot write", &out.path, &e))?;
    out.file.sha256 = digest;
    Ok(out)
}

impl Subrosa {
    /// Uploads a staged file for every member device of `conversation` but
    /// this one, and fills in its blob id. `progress` hears (bytes held by
    /// the server, blob length).
    ///
    /// # Errors
    /// The server's refusals (`blob_too_large`, `blob_quota_exceeded`),
    /// network failures, an unknown conversation.
    pub async fn upload_staged(
        &self,
        conversation: &ConversationId,
        staged: &mut Staged,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), ClientError> {
        self.upload_staged_as(conversation, staged, None, &mut |_| Ok(()), progress).await
    }

    /// [`Self::upload_staged`], resuming the upload of `blob` when given
    /// (a new blob when the server no longer has it); `created` hears a new
    /// blob's id before any byte of it is sent.
    async fn upload_staged_as(
        &self,
        conversation: &ConversationId,
        staged: &mut Staged,
        blob: Option<BlobId>,
        created: &mut (dyn FnMut(&BlobId) -> Result<(), ClientError> + Send),
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), ClientError> {
        let len = staged.blob_len;
        if let Some(blob) = blob {
            match crate::blobs::upload(&self.api, &blob, &staged.path, &mut |done| progress(done, len)).await {
                Ok(()) => {
                    staged.file.blob = blob.0;
                    return Ok(());
                }
                Err(e) if e.code() == Some(subrosa_proto::ErrorCode::UnknownBlob) => {}
                Err(e) => return Err(e),
            }
        }
        let me = self.identity().address();
        let readers: Vec<_> = self.members(conversation)?.into_iter().map(|m| m.address).filter(|a| *a != me).collect();
        if readers.is_empty() {
            return Err(ClientError::Input("nobody else is in this conversation to send a file to".into()));
        }
        // In a conversation with disappearing messages the blob goes when
        // its message does (the message is sent after the upload, so later).
        let expires_at = self.expiry_from(conversation, self.now_ms())?;
        let new = self.api.blob_create(staged.blob_len, readers, expires_at).await?.blob;
        created(&new)?;
        crate::blobs::upload(&self.api, &new, &staged.path, &mut |done| progress(done, len)).await?;
        staged.file.blob = new.0;
        Ok(())
    }

    /// Sends `files` (with a caption, possibly empty) to `to`: each is
    /// sealed under a fresh key, uploaded for the conversation's member
    /// devices, and the pointers, keys and checks go inside one message of
    /// kind 7, stored in history as the caption with its files. A first
    /// message to a handle starts the conversation (the blobs need its
    /// members). `progress` hears (file name, bytes, total) for sealing and
    /// uploading.
    ///
    /// # Errors
    /// As [`Subrosa::send_body`]; a file that cannot be read; the server's
    /// refusals of a blob (`blob_too_large`, `blob_quota_exceeded`), after
    /// which nothing is sent.
    pub async fn send_attachments(
        &self,
        home: &Path,
        to: &crate::Target,
        caption: &str,
        paths: &[PathBuf],
        accept_key_change: bool,
        progress: &mut (dyn FnMut(&str, u64, u64) + Send),
    ) -> Result<Option<crate::StoredMessage>, ClientError> {
        use subrosa_core::attachment::{Attachments, MAX_FILES};
        use subrosa_core::content::Body;
        if paths.is_empty() || paths.len() > MAX_FILES {
            return Err(ClientError::Input(format!("attach 1 to {MAX_FILES} files")));
        }
        if caption.len() > subrosa_core::content::MAX_TEXT_BYTES {
            return Err(ClientError::Input("the caption is over 64 KiB".into()));
        }
        // A file that cannot be read stops everything before anything
        // reaches the server.
        for p in paths {
            let meta =
                std::fs::metadata(p).map_err(|e| ClientError::Input(format!("cannot read {}: {e}", p.display())))?;
            if !meta.is_file() {
                return Err(ClientError::Input(format!("{} is not a file", p.display())));
            }
        }
        // The blobs are for the members as they are now.
        self.catch_up().await?;
        let conversation = match to {
            crate::Target::Conversation(id) => *id,
            crate::Target::Direct(peer) => match self.direct_conversation(peer)? {
                Some(id) => id,
                None => self.start_direct(peer, None).await?,
            },
        };
        // Each file sealed once; an upload interrupted before resumes.
        let mut staged = Vec::with_capacity(paths.len());
        let mut resumed = Vec::with_capacity(paths.len());
        let mut keys = Vec::with_capacity(paths.len());
        for p in paths {
            let key = unsent_key(&conversation, p)?;
            let before = self
                .store()
                .read(|tx| tx.meta(&key))?
                .and_then(|v| serde_json::from_slice::<Unsent>(&v).ok())
                .and_then(|u| u.resume(home));
            let (s, blob) = match before {
                Some(found) => found,
                None => {
                    let label = format!("sealing {}", p.display());
                    let mut s = stage(home, p, &mut |done, total| progress(&label, done, total))?;
                    let record = Unsent::of(&s, None).bytes()?;
                    self.store().write(|tx| tx.set_meta(&key, &record))?;
                    s.keep = true;
                    (s, None)
                }
            };
            staged.push(s);
            resumed.push(blob);
            keys.push(key);
        }
        for ((s, blob), key) in staged.iter_mut().zip(resumed).zip(&keys) {
            let label = format!("uploading {}", s.file.name);
            let unsent = Unsent::of(s, None);
            let store = self.store();
            let mut created = |b: &BlobId| -> Result<(), ClientError> {
                let mut with_blob = Unsent::of_parts(&unsent);
                with_blob.blob = Some(b.to_hex());
                let record = with_blob.bytes()?;
                store.write(|tx| tx.set_meta(key, &record))
            };
            self.upload_staged_as(&conversation, s, blob, &mut created, &mut |done, total| {
                progress(&label, done, total)
            })
            .await?;
        }
        let files: Vec<AttachedFile> = staged.iter().map(|s| s.file.clone()).collect();
        let body = Body::Attachment(Attachments { caption: caption.to_owned(), reply_to: None, files: files.clone() });
        let message_id = subrosa_proto::MessageId(rand::random());
        let target = crate::Target::Conversation(conversation);
        let sent = self.send_body_as(&target, body, Some(caption.to_owned()), accept_key_change, message_id).await;
        if matches!(sent, Ok(_) | Err(ClientError::Pending(_))) {
            self.store().write(|tx| {
                tx.put_attachments(&conversation, &message_id.0, &files, AttachmentState::Sent)?;
                for key in &keys {
                    tx.delete_meta(key)?;
                }
                Ok(())
            })?;
            for s in &mut staged {
                s.keep = false;
            }
        }
        sent
    }

    /// Downloads and checks every received attachment not yet stored,
    /// keeping each sealed in the home's attachment folder and telling the
    /// server it was fetched. A blob that fails its checks (or is gone from
    /// the server) is refused and its row says why; it is returned with
    /// that reason. `progress` hears (name, bytes, total).
    ///
    /// # Errors
    /// Store and file-system failures, and network failures (the download
    /// resumes at the next call).
    pub async fn fetch_attachments(
        &self,
        home: &Path,
        progress: &mut (dyn FnMut(&str, u64, u64) + Send),
    ) -> Result<Vec<(AttachmentRow, String)>, ClientError> {
        let pending = self.store().read(|tx| tx.pending_attachments())?;
        let mut refused = Vec::new();
        if pending.is_empty() {
            return Ok(refused);
        }
        let dir = ensure_folder(home)?;
        for row in pending {
            let blob = BlobId(row.file.blob);
            let len = attachment::blob_len(row.file.size);
            let partial = dir.join(format!("{blob}.part"));
            let name = row.file.name.clone();
            let got =
                crate::blobs::download(&self.api, &blob, len, &partial, &mut |done| progress(&name, done, len)).await;
            let why = match got {
                Ok(()) => match check(&row.file, &partial) {
                    Ok(()) => None,
                    Err(e) => Some(e.to_string()),
                },
                Err(e) if e.code() == Some(subrosa_proto::ErrorCode::UnknownBlob) => {
                    Some("it is no longer on the server (expired, or never uploaded)".to_owned())
                }
                // The blob is not what the message says (its size is the
                // sender's word): this file is refused, and the others
                // still download. A fatal error here would leave the row
                // pending and stop every later download at it.
                Err(ClientError::Protocol(why)) => Some(format!("the server's blob does not match the message: {why}")),
                Err(e) => return Err(e),
            };
            match why {
                None => {
                    let kept = dir.join(format!("{blob}.blob"));
                    std::fs::rename(&partial, &kept).map_err(|e| io("cannot keep", &kept, &e))?;
                    let local = format!("{blob}.blob");
                    self.store().write(|tx| {
                        tx.set_attachment(
                            &row.conversation,
                            &row.message_id,
                            row.index,
                            &AttachmentState::Stored,
                            Some(&local),
                            None,
                        )
                    })?;
                    // Only now, with the blob kept here, may the server delete
                    // it. Unanswered, it stays there until the message TTL.
                    let _ = self.api.blob_fetched(&blob).await;
                }
                Some(why) => {
                    let _ = std::fs::remove_file(&partial);
                    let state = AttachmentState::Refused(why.clone());
                    self.store().write(|tx| {
                        tx.set_attachment(&row.conversation, &row.message_id, row.index, &state, None, None)
                    })?;
                    refused.push((row, why));
                }
            }
        }
        Ok(refused)
    }

    /// Writes the plaintext of every stored attachment not yet saved into
    /// `dir`, under its sender's name made safe, never over an existing
    /// file (`name (1).ext` and so on instead). Returns the rows saved.
    ///
    /// # Errors
    /// [`ClientError::Io`] for `dir`; a kept blob that no longer opens
    /// (altered on this disk) is refused, not saved.
    pub fn save_attachments(&self, home: &Path, dir: &Path) -> Result<Vec<AttachmentRow>, ClientError> {
        self.save_where(home, dir, &|_| true)
    }

    /// As [`Self::save_attachments`], only the files of one message (a
    /// front end's "save this").
    ///
    /// # Errors
    /// As [`Self::save_attachments`].
    pub fn save_attachments_of(
        &self,
        home: &Path,
        dir: &Path,
        conversation: &ConversationId,
        message_id: &[u8],
    ) -> Result<Vec<AttachmentRow>, ClientError> {
        self.save_where(home, dir, &|row| row.conversation == *conversation && row.message_id == message_id)
    }

    fn save_where(
        &self,
        home: &Path,
        dir: &Path,
        wanted: &dyn Fn(&AttachmentRow) -> bool,
    ) -> Result<Vec<AttachmentRow>, ClientError> {
        let mut saved = Vec::new();
        for row in self.store().read(|tx| tx.unsaved_attachments())?.into_iter().filter(|r| wanted(r)) {
            let Some(local) = row.local.as_deref() else { continue };
            let blob = folder(home).join(local);
            let (path, file) = create_unique(dir, &attachment::safe_file_name(&row.file.name))?;
            let result = open_into(&row.file, &blob, file);
            if let Err(e) = result {
                let _ = std::fs::remove_file(&path);
                let state = AttachmentState::Refused(e.to_string());
                self.store()
                    .write(|tx| tx.set_attachment(&row.conversation, &row.message_id, row.index, &state, None, None))?;
                continue;
            }
            let shown = path.to_string_lossy().into_owned();
            self.store().write(|tx| {
                tx.set_attachment(
                    &row.conversation,
                    &row.message_id,
                    row.index,
                    &AttachmentState::Stored,
                    None,
                    Some(&shown),
                )
            })?;
            let mut row = row;
            row.saved = Some(shown);
            saved.push(row);
        }
        Ok(saved)
    }

    /// The files of every message of a conversation, as stored, in one
    /// read (each message's in order).
    ///
    /// # Errors
    /// Store errors.
    pub fn attachments_in(&self, conversation: &ConversationId) -> Result<Vec<AttachmentRow>, ClientError> {
        self.store().read(|tx| tx.attachments_in(conversation))
    }

    /// The files of a message, as stored.
    ///
    /// # Errors
    /// Store errors.
    pub fn attachments_of(
        &self,
        conversation: &ConversationId,
        message_id: &[u8],
    ) -> Result<Vec<AttachmentRow>, ClientError> {
        self.store().read(|tx| tx.attachments_of(conversation, message_id))
    }
}

/// Opens a downloaded blob to nowhere: every segment, the padding and the
/// digest are checked before the blob is kept.
fn check(file: &AttachedFile, blob: &Path) -> Result<(), AttachmentError> {
    let key = AttachmentKey::from_bytes(*file.key);
    let src = std::fs::File::open(blob)?;
    attachment::open(&key, file.size, &file.sha256, &mut BufReader::new(src), &mut std::io::sink(), &mut |_| {})
}

fn open_into(file: &AttachedFile, blob: &Path, dst: std::fs::File) -> Result<(), AttachmentError> {
    let key = AttachmentKey::from_bytes(*file.key);
    let src = std::fs::File::open(blob)?;
    let mut writer = BufWriter::new(dst);
    attachment::open(&key, file.size, &file.sha256, &mut BufReader::new(src), &mut writer, &mut |_| {})?;
    let dst = writer.into_inner().map_err(|e| AttachmentError::Io(std::io::Error::other(e.to_string())))?;
    dst.sync_all()?;
    Ok(())
}

/// Creates `name` in `dir`, or `stem (N).ext` when it exists: never
/// replaces or follows an existing file.
fn create_unique(dir: &Path, name: &str) -> Result<(PathBuf, std::fs::File), ClientError> {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_owned(), format!(".{e}")),
        _ => (name.to_owned(), String::new()),
    };
    for n in 0..1000u32 {
        let candidate = if n == 0 { name.to_owned() } else { format!("{stem} ({n}){ext}") };
        let path = dir.join(candidate);
        match std::fs::File::create_new(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("cannot save into", dir, &e)),
        }
    }
    Err(ClientError::Io(format!("{} holds too many files named {name}", dir.display())))
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_file_never_replaces_another() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a.txt"), b"mine").expect("write");
        let (p1, _) = create_unique(dir.path(), "a.txt").expect("create");
        let (p2, _) = create_unique(dir.path(), "a.txt").expect("create");
        assert_eq!(p1, dir.path().join("a (1).txt"));
        assert_eq!(p2, dir.path().join("a (2).txt"));
        assert_eq!(std::fs::read(dir.path().join("a.txt")).expect("read"), b"mine");
        let (p3, _) = create_unique(dir.path(), "noext").expect("create");
        assert_eq!(p3, dir.path().join("noext"));
        #[cfg(unix)]
        {
            // A link planted under the name is not followed.
            std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("link")).expect("symlink");
            let (p4, _) = create_unique(dir.path(), "link").expect("create");
            assert_eq!(p4, dir.path().join("link (1)"));
            assert!(!dir.path().join("target").exists());
        }
    }
}
