//! A subscriber that keeps every progress event of a channel, and the order rules of one
//! successful task's events.
#![allow(unreachable_pub, clippy::print_stdout, clippy::print_stderr)]
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use echomimic_protocol::{ProgressEvent, Status};

/// An event with the time it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub event: ProgressEvent,
    pub raw: Vec<u8>,
}

/// Subscribes to a channel (before anything is submitted) and keeps every event.
pub struct Recorder {
    events: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn start(client: &redis::Client, channel: &str) -> Recorder {
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (events, stop, client, channel) = (
                events.clone(),
                stop.clone(),
                client.clone(),
                channel.to_owned(),
            );
            std::thread::spawn(move || {
                let mut ready = Some(ready_tx);
                // Reconnects when Redis goes away (the Redis restart test).
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut con) = client.get_connection() else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    let mut ps = con.as_pubsub();
                    if ps.subscribe(&channel).is_err() {
                        continue;
                    }
                    let _ = ps.set_read_timeout(Some(Duration::from_millis(100)));
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                    while !stop.load(Ordering::SeqCst) {
                        match ps.get_message() {
                            Ok(msg) => {
                                let raw = msg.get_payload_bytes().to_vec();
                                if let Ok(event) = ProgressEvent::parse_any(&raw) {
                                    events.lock().unwrap().push(Seen {
                                        at: Instant::now(),
                                        event,
                                        raw,
                                    });
                                }
                            }
                            Err(e) if e.is_timeout() => {}
                            Err(_) => break,
                        }
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscribed");
        Recorder {
            events,
            stop,
            thread: Some(thread),
        }
    }

    pub fn all(&self) -> Vec<Seen> {
        self.events.lock().unwrap().clone()
    }

    pub fn of(&self, task_id: &str) -> Vec<ProgressEvent> {
        self.all()
            .into_iter()
            .filter(|s| s.event.task_id == task_id)
            .map(|s| s.event)
            .collect()
    }

    /// The messages of `task_id`'s `processing` events, one per claim
    /// (`task claimed (attempt n of m)`).
    pub fn claims(&self, task_id: &str) -> Vec<String> {
        self.of(task_id)
            .into_iter()
            .filter(|e| e.status == Status::Processing)
            .filter_map(|e| e.message)
            .collect()
    }

    pub fn terminal_count(&self, task_id: &str) -> usize {
        self.of(task_id).iter().filter(|e| e.is_terminal()).count()
    }

    /// Waits for the first terminal event of `task_id`.
    pub fn wait_terminal(&self, task_id: &str, timeout: Duration) -> ProgressEvent {
        let end = Instant::now() + timeout;
        loop {
            if let Some(e) = self.of(task_id).into_iter().find(|e| e.is_terminal()) {
                return e;
            }
            assert!(
                Instant::now() < end,
                "no terminal event for {task_id} within {timeout:?}; saw {:#?}",
                self.of(task_id)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for an event of `task_id` with `status`.
    pub fn wait_status(&self, task_id: &str, status: Status, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.of(task_id).iter().any(|e| e.status == status) {
            assert!(
                Instant::now() < end,
                "no {status} event for {task_id} within {timeout:?}; saw {:#?}",
                self.of(task_id)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `n` terminal events (any task) have arrived.
    pub fn wait_terminals(&self, n: usize, timeout: Duration) -> Vec<ProgressEvent> {
        let end = Instant::now() + timeout;
        loop {
            let t: Vec<_> = self
                .all()
                .into_iter()
                .filter(|s| s.event.is_terminal())
                .map(|s| s.event)
                .collect();
            if t.len() >= n {
                return t;
            }
            assert!(
                Instant::now() < end,
                "only {} of {n} terminal events within {timeout:?}",
                t.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks the order rules of one successful task's events.
pub fn assert_happy_sequence(events: &[ProgressEvent]) {
    let rank = |s: Status| match s {
        Status::Processing => 0,
        Status::Downloading => 1,
        Status::FaceDetecting => 2,
        Status::Inference => 3,
        Status::MergingAudio => 4,
        Status::Uploading => 5,
        Status::Completed => 6,
        other => panic!("unexpected status {other}"),
    };
    assert_eq!(events.first().map(|e| e.status), Some(Status::Processing));
    assert_eq!(events.last().map(|e| e.status), Some(Status::Completed));
    let mut prev_rank = 0;
    let mut prev_p = 0.0f32;
    for e in events {
        let r = rank(e.status);
        assert!(r >= prev_rank, "status went back: {events:#?}");
        let p = e.progress.expect("progress on every event");
        assert!(
            p >= prev_p,
            "progress went back ({prev_p} -> {p}): {events:#?}"
        );
        prev_rank = r;
        prev_p = p;
    }
    for s in [
        Status::Downloading,
        Status::FaceDetecting,
        Status::Inference,
        Status::MergingAudio,
        Status::Uploading,
    ] {
        assert!(events.iter().any(|e| e.status == s), "no {s}: {events:#?}");
    }
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
}
