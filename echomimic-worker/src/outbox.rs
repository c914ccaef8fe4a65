//! Finished videos whose upload failed, kept on local disk so that a requeued task is
//! uploaded again instead of generated again.
//!
//! When the temp-file API stays down past `--outage-secs` while a video waits to be
//! uploaded, the task is requeued (its attempt counted) and its MP4 moves here, named by a
//! hash of the task as the client sent it (`{temp_dir}/echomimic-outbox/{key}.mp4`, with its
//! `completed` message in `{key}.json`). Whichever worker of this machine claims the task
//! next (workers sharing a temp folder share the outbox) finds the video and only uploads
//! it: no second GPU run. A worker on another machine generates it again. A kept video is
//! removed once uploaded, when its task fails for good, and at start-up after a day (a task
//! result lives that long).
//!
//! A leaf module: it imports nothing of this crate.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use echomimic_protocol::QueueItem;
use sha2::{Digest, Sha256};

/// The outbox folder's name in the temp folder.
const OUTBOX_DIR: &str = "echomimic-outbox";

/// Kept videos older than this are swept at start-up.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A kept video and the message its `completed` event carries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parcel {
    pub(crate) video: PathBuf,
    pub(crate) message: String,
}

/// The outbox of one temp folder.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub(crate) fn new(temp_dir: &Path) -> Outbox {
        Outbox {
            dir: temp_dir.join(OUTBOX_DIR),
        }
    }

    /// The name of `item`'s files: the task as the client sent it (unwrapped from a requeue
    /// envelope, so every attempt of one task has the same key), as canonical JSON (members
    /// sorted: an envelope re-serialises the task), hashed.
    fn key(item: &QueueItem) -> String {
        let sent = item.original_payload();
        let canonical = serde_json::from_str::<serde_json::Value>(&sent)
            .map(|v| v.to_string())
            .unwrap_or(sent);
        let digest = Sha256::digest(canonical.as_bytes());
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    fn paths(&self, item: &QueueItem) -> (PathBuf, PathBuf) {
        let key = Outbox::key(item);
        (
            self.dir.join(format!("{key}.mp4")),
            self.dir.join(format!("{key}.json")),
        )
    }

    /// Keeps `video` (moved, or copied when the outbox is on another file system) with its
    /// `completed` message for the next attempt of `item`.
    pub(crate) fn keep(
        &self,
        item: &QueueItem,
        video: &Path,
        message: &str,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (mp4, json) = self.paths(item);
        if std::fs::rename(video, &mp4).is_err() {
            std::fs::copy(video, &mp4)?;
        }
        let note = serde_json::json!({ "message": message });
        std::fs::write(json, note.to_string())
    }

    /// The video kept for `item`, if any.
    pub(crate) fn find(&self, item: &QueueItem) -> Option<Parcel> {
        let (mp4, json) = self.paths(item);
        if !mp4.is_file() {
            return None;
        }
        let note: serde_json::Value = serde_json::from_slice(&std::fs::read(json).ok()?).ok()?;
        Some(Parcel {
            video: mp4,
            message: note["message"].as_str()?.to_owned(),
        })
    }

    /// Forgets what is kept for `item`.
    pub(crate) fn remove(&self, item: &QueueItem) {
        let (mp4, json) = self.paths(item);
        let _ = std::fs::remove_file(mp4);
        let _ = std::fs::remove_file(json);
    }

    /// Removes kept files at least `max_age` old; how many.
    pub(crate) fn sweep(&self, max_age: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= max_age);
            if old && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_video_is_found_by_every_attempt_of_its_task_only() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path());
        let task = br#"{"task_id":"t","session_id":"s","ref_image_id":"i","audio_id":"a"}"#;
        let first = QueueItem::parse(task);
        let again = QueueItem::parse(first.requeued("upload failed").unwrap().as_bytes());
        let other = QueueItem::parse(
            &task[..task.len() - 2]
                .iter()
                .chain(b"b\"}")
                .copied()
                .collect::<Vec<_>>(),
        );
        assert_eq!(outbox.find(&first), None);
        let video = dir.path().join("video.mp4");
        std::fs::write(&video, b"mp4 bytes").unwrap();
        outbox.keep(&first, &video, "video ready").unwrap();
        assert!(!video.exists(), "moved, not copied");
        let parcel = outbox.find(&again).expect("the requeued item finds it");
        assert_eq!(parcel.message, "video ready");
        assert_eq!(std::fs::read(&parcel.video).unwrap(), b"mp4 bytes");
        assert_eq!(outbox.find(&other), None);
        assert_eq!(outbox.sweep(MAX_AGE), 0);
        assert_eq!(outbox.sweep(Duration::ZERO), 2);
        assert_eq!(outbox.find(&again), None);
        outbox.keep(&first, &parcel.video, "x").unwrap_err();
        std::fs::write(&video, b"again").unwrap();
        outbox.keep(&first, &video, "y").unwrap();
        outbox.remove(&again);
        assert_eq!(outbox.find(&first), None);
    }
}
