//! On-disk storage: `files/<uuid>` holds the bytes, `meta/<uuid>.json` the metadata, `tmp/`
//! uploads in progress. The metadata file is the commit point: it is written to `tmp/`, synced
//! and renamed into `meta/` only after the data file is in place, so a crash leaves either a
//! complete entry or debris that the next start-up removes. Stored names are always the UUID;
//! the client's file name is metadata only.

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

pub(crate) struct Store {
    files: PathBuf,
    meta: PathBuf,
    tmp: PathBuf,
    index: Mutex<HashMap<Uuid, Meta>>,
    clock: Clock,
    expiry: Duration,
}

impl Store {
    /// Opens (creating if needed) the storage under `root` and loads its index, removing debris
    /// of interrupted uploads and expired files.
    pub(crate) fn open(root: &Path, expiry: Duration, clock: Clock) -> io::Result<Store> {
        let store = Store {
            files: root.join("files"),
            meta: root.join("meta"),
            tmp: root.join("tmp"),
            index: Mutex::new(HashMap::new()),
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
        tracing::info!(files = index.len(), "temp-file index loaded");
        *lock(&store.index) = index;
        Ok(store)
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

    /// Makes an upload visible: data into `files/`, then the metadata sidecar into `meta/`.
    pub(crate) fn commit(
        &self,
        mut upload: PendingUpload,
        original_name: String,
        extension: String,
        file_type: FileType,
        content_type: &str,
        size: u64,
    ) -> io::Result<Meta> {
        let now = self.clock.now();
        let meta = Meta {
            file_id: upload.id.to_string(),
            original_name,
            extension,
            file_type,
            content_type: content_type.to_owned(),
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
        let live = self.get(id).is_some();
        if live && lock(&self.index).remove(&id).is_some() {
            self.remove_files(id);
            return true;
        }
        false
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
                index.remove(id);
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
