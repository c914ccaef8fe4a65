//! On-disk storage: `files/<uuid>` holds the bytes, `meta/<uuid>.json` the metadata, `tmp/`
//! uploads in progress. The metadata file is the commit point: it is written to `tmp/`, synced
//! and renamed into `meta/` only after the data file is in place, so a crash leaves either a
//! complete entry or debris that the next start-up removes. Stored names are always the UUID;
//! the client's file name is metadata only.
//!
//! Space: the bytes of stored files plus the bytes reserved by uploads in progress stay under
//! the quota, and an upload never takes the disk below the free-space floor (both checked before
//! the body is read when its length is known, and again as it is written).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types::FileType;

/// A source of the current time; [`ManualClock`] lets tests move time forward.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<ManualClock>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(None)
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            Some(m) => m.now(),
        }
    }
}

/// A clock that only moves when told to (for tests of expiry).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    /// The time it reads.
    pub fn now(&self) -> SystemTime {
        *lock(&self.0)
    }

    /// Moves it forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut t = lock(&self.0);
        *t += by;
    }
}

impl From<ManualClock> for Clock {
    fn from(m: ManualClock) -> Self {
        Clock(Some(m))
    }
}

/// Locks a mutex, recovering the data if another thread panicked while holding it (every
/// critical section here leaves the map consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Metadata of one stored file (the JSON sidecar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) file_id: String,
    pub(crate) original_name: String,
    pub(crate) extension: String,
    pub(crate) file_type: FileType,
    pub(crate) content_type: String,
    pub(crate) size: u64,
    /// Unix milliseconds.
    pub(crate) created_at_ms: u64,
    /// Unix milliseconds; the file is gone from this instant on.
    pub(crate) expires_at_ms: u64,
}

/// What an upload stores besides its bytes.
pub(crate) struct NewFile {
    pub(crate) original_name: String,
    pub(crate) extension: String,
    pub(crate) file_type: FileType,
    pub(crate) content_type: String,
    pub(crate) size: u64,
}

/// An upload in progress; its temporary file is deleted on drop unless committed.
pub(crate) struct PendingUpload {
    pub(crate) id: Uuid,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    committed: bool,
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The storage limits of a [`Store`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SpaceLimits {
    /// Most bytes of files stored and being uploaded at once; `None` = no quota.
    pub(crate) quota: Option<u64>,
    /// Free bytes an upload must leave on the storage's filesystem.
    pub(crate) min_free: u64,
}

/// Why an upload does not fit.
#[derive(Debug)]
pub(crate) enum NoSpace {
    /// Stored plus reserved bytes would pass the quota.
    Quota { quota: u64, used: u64, wanted: u64 },
    /// The filesystem would fall below the free-space floor.
    Disk { free: u64, floor: u64, wanted: u64 },
}

impl std::fmt::Display for NoSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoSpace::Quota {
                quota,
                used,
                wanted,
            } => write!(
                f,
                "the server's storage quota is full ({used} of {quota} bytes in use, \
                 {wanted} more needed); retry later"
            ),
            NoSpace::Disk {
                free,
                floor,
                wanted,
            } => write!(
                f,
                "the server's disk is full ({free} bytes free, {floor} kept free, \
                 {wanted} more needed); retry later"
            ),
        }
    }
}

/// Bytes in use: stored files and reservations of uploads in progress.
#[derive(Debug, Default)]
struct Usage {
    stored: u64,
    reserved: u64,
}

/// Free-space checks run at most once per this many newly reserved bytes.
const DISK_CHECK_EVERY: u64 = 4 * 1024 * 1024;

pub(crate) struct Store {
    files: PathBuf,
    meta: PathBuf,
    tmp: PathBuf,
    index: Mutex<HashMap<Uuid, Meta>>,
    usage: Mutex<Usage>,
    limits: SpaceLimits,
    clock: Clock,
    expiry: Duration,
}

/// Bytes set aside for one upload; given back when dropped (the upload failed) or turned into
/// stored bytes by [`Store::commit`].
pub(crate) struct Reservation<'a> {
    store: &'a Store,
    bytes: u64,
    /// Reserved bytes at the last free-space check.
    checked_at: u64,
}

impl Reservation<'_> {
    /// Makes the reservation cover at least `total` bytes.
    pub(crate) fn cover(&mut self, total: u64) -> Result<(), NoSpace> {
        if total <= self.bytes {
            return Ok(());
        }
        let more = total - self.bytes;
        let check_disk = total - self.checked_at >= DISK_CHECK_EVERY || self.checked_at == 0;
        self.store.take(more, check_disk)?;
        self.bytes = total;
        if check_disk {
            self.checked_at = total;
        }
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut usage = lock(&self.store.usage);
        usage.reserved = usage.reserved.saturating_sub(self.bytes);
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Store {
    /// Opens (creating if needed) the storage under `root` and loads its index, removing debris
    /// of interrupted uploads and expired files.
    pub(crate) fn open(
        root: &Path,
        expiry: Duration,
        clock: Clock,
        limits: SpaceLimits,
    ) -> io::Result<Store> {
        let store = Store {
            files: root.join("files"),
            meta: root.join("meta"),
            tmp: root.join("tmp"),
            index: Mutex::new(HashMap::new()),
            usage: Mutex::new(Usage::default()),
            limits,
            clock,
            expiry,
        };
        for dir in [&store.files, &store.meta, &store.tmp] {
            fs::create_dir_all(dir)?;
        }
        for entry in fs::read_dir(&store.tmp)? {
            let _ = fs::remove_file(entry?.path());
        }
        let now = unix_ms(store.clock.now());
        let mut index = HashMap::new();
        for entry in fs::read_dir(&store.meta)? {
            let path = entry?.path();
            let loaded = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| Uuid::parse_str(s).ok())
                .and_then(|id| {
                    let meta: Meta = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
                    let size = fs::metadata(store.files.join(id.to_string())).ok()?.len();
                    (meta.file_id == id.to_string() && meta.size == size).then_some((id, meta))
                });
            match loaded {
                Some((id, meta)) if meta.expires_at_ms > now => {
                    index.insert(id, meta);
                }
                Some((id, _)) => store.remove_files(id),
                None => {
                    tracing::warn!(path = %path.display(), "removing unreadable or orphaned metadata");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        for entry in fs::read_dir(&store.files)? {
            let path = entry?.path();
            let known = path
                .file_name()
                .and_then(|s| s.to_str())
                .and_then(|s| Uuid::parse_str(s).ok())
                .is_some_and(|id| index.contains_key(&id));
            if !known {
                tracing::warn!(path = %path.display(), "removing data file without metadata");
                let _ = fs::remove_file(&path);
            }
        }
        let stored: u64 = index.values().map(|m| m.size).sum();
        tracing::info!(
            files = index.len(),
            bytes = stored,
            "temp-file index loaded"
        );
        *lock(&store.index) = index;
        lock(&store.usage).stored = stored;
        Ok(store)
    }

    /// Reserves `bytes` for an upload (its declared length; 0 when unknown), or says why they
    /// do not fit.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<Reservation<'_>, NoSpace> {
        let mut r = Reservation {
            store: self,
            bytes: 0,
            checked_at: 0,
        };
        r.cover(bytes.max(1))?;
        Ok(r)
    }

    /// Adds `more` reserved bytes when the quota (and, with `check_disk`, the free-space
    /// floor) allows them.
    fn take(&self, more: u64, check_disk: bool) -> Result<(), NoSpace> {
        let mut usage = lock(&self.usage);
        let used = usage.stored + usage.reserved;
        if let Some(quota) = self.limits.quota {
            if used.saturating_add(more) > quota {
                return Err(NoSpace::Quota {
                    quota,
                    used,
                    wanted: more,
                });
            }
        }
        if check_disk {
            match free_bytes(&self.tmp) {
                // Other uploads' reservations are not on disk yet: count them as taken.
                Ok(free) => {
                    let free = free.saturating_sub(usage.reserved);
                    if free < more.saturating_add(self.limits.min_free) {
                        return Err(NoSpace::Disk {
                            free,
                            floor: self.limits.min_free,
                            wanted: more,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, dir = %self.tmp.display(), "cannot read the free space; not checked");
                }
            }
        }
        usage.reserved += more;
        Ok(())
    }

    /// Bytes of stored files and of reservations.
    pub(crate) fn used_bytes(&self) -> u64 {
        let usage = lock(&self.usage);
        usage.stored + usage.reserved
    }

    /// Starts an upload: a fresh UUID v4 and a temporary file.
    pub(crate) fn begin_upload(&self) -> io::Result<PendingUpload> {
        let id = Uuid::new_v4();
        let path = self.tmp.join(format!("{id}.part"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(PendingUpload {
            id,
            path,
            file,
            committed: false,
        })
    }

    /// Makes an upload visible: data into `files/`, then the metadata sidecar into `meta/`;
    /// the bytes `reservation` held become stored bytes.
    pub(crate) fn commit(
        &self,
        mut upload: PendingUpload,
        reservation: Reservation<'_>,
        file: NewFile,
    ) -> io::Result<Meta> {
        let now = self.clock.now();
        let size = file.size;
        let meta = Meta {
            file_id: upload.id.to_string(),
            original_name: file.original_name,
            extension: file.extension,
            file_type: file.file_type,
            content_type: file.content_type,
            size,
            created_at_ms: unix_ms(now),
            expires_at_ms: unix_ms(now + self.expiry),
        };
        upload.file.sync_all()?;
        let data_path = self.files.join(upload.id.to_string());
        fs::rename(&upload.path, &data_path)?;
        upload.committed = true;
        let result = (|| {
            let tmp_meta = self.tmp.join(format!("{}.json", upload.id));
            let mut f = File::create(&tmp_meta)?;
            f.write_all(&serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&tmp_meta, self.meta.join(format!("{}.json", upload.id)))?;
            sync_dir(&self.files);
            sync_dir(&self.meta);
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&data_path);
            return Err(e);
        }
        lock(&self.index).insert(upload.id, meta.clone());
        // The reserved bytes become stored ones (the reservation gives back what it held).
        lock(&self.usage).stored += size;
        drop(reservation);
        Ok(meta)
    }

    /// The metadata of a live file; an expired one is deleted and reported as absent.
    pub(crate) fn get(&self, id: Uuid) -> Option<Meta> {
        let now = unix_ms(self.clock.now());
        let mut index = lock(&self.index);
        let meta = index.get(&id)?.clone();
        if meta.expires_at_ms <= now {
            index.remove(&id);
            drop(index);
            self.forget_bytes(meta.size);
            self.remove_files(id);
            tracing::info!(file_id = %id, "expired on access");
            return None;
        }
        Some(meta)
    }

    /// A live file's metadata and an open handle to its bytes.
    pub(crate) fn open_file(&self, id: Uuid) -> Option<(Meta, File)> {
        let meta = self.get(id)?;
        let file = File::open(self.files.join(id.to_string())).ok()?;
        Some((meta, file))
    }

    /// Deletes a file; false when it did not exist (or had expired).
    pub(crate) fn delete(&self, id: Uuid) -> bool {
        if self.get(id).is_none() {
            return false;
        }
        let Some(meta) = lock(&self.index).remove(&id) else {
            return false;
        };
        self.forget_bytes(meta.size);
        self.remove_files(id);
        true
    }

    /// Deletes every expired file; returns how many.
    pub(crate) fn sweep(&self) -> usize {
        let now = unix_ms(self.clock.now());
        let expired: Vec<Uuid> = {
            let mut index = lock(&self.index);
            let ids: Vec<Uuid> = index
                .iter()
                .filter(|(_, m)| m.expires_at_ms <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                if let Some(meta) = index.remove(id) {
                    self.forget_bytes(meta.size);
                }
            }
            ids
        };
        for id in &expired {
            self.remove_files(*id);
        }
        expired.len()
    }

    /// How many files are live (expired ones not yet swept included).
    pub(crate) fn len(&self) -> usize {
        lock(&self.index).len()
    }

    fn forget_bytes(&self, size: u64) {
        let mut usage = lock(&self.usage);
        usage.stored = usage.stored.saturating_sub(size);
    }

    fn remove_files(&self, id: Uuid) {
        // Metadata first: without it the entry no longer exists, even if the data removal fails.
        let _ = fs::remove_file(self.meta.join(format!("{id}.json")));
        let _ = fs::remove_file(self.files.join(id.to_string()));
    }
}

fn sync_dir(dir: &Path) {
    // Best effort: makes the renames durable on filesystems that need it.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
