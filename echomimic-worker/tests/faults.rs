//! Faults a worker must survive without losing, stranding or wrongly failing a task, with the
//! stand-in engine ([`FakeEngine`]) in process, against a real Redis (a private one where the
//! test changes its settings) and a real temp-file server. Each test names the fault it
//! injects; the worker README's fault table points here.

mod common;

use std::time::{Duration, Instant};

use common::*;
use echomimic_protocol::{keys, ErrorCode, QueueItem, Status};
use redis::Commands;

/// This machine's host name as the worker writes it into its lease.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn config_set(con: &mut redis::Connection, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(con)
        .expect("CONFIG SET");
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_outcome_refused_for_lack_of_memory_is_recorded_once_memory_is_back() -> TestResult {
    let Some(mut redis) = PrivateRedis::start() else {
        return Ok(());
    };
    let world = World::with_redis(&redis.url());
    let rec = world.recorder();
    let (worker, task) = start_with_running_task(&world, &rec, &unique("oom"), 2);
    // Redis full: every write that could grow memory is refused with OOM from here on.
    let mut admin = world.con();
    config_set(&mut admin, "maxmemory-policy", "noeviction");
    config_set(&mut admin, "maxmemory", "1");
    // The run (2 calls × 0.3 s), encoding and upload end well within this; the outcome is
    // refused meanwhile and must be kept, not abandoned.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(rec.terminal_count(&task.task_id), 0);
    assert_eq!(world.processing_items().len(), 1, "the claim is still held");
    assert!(!worker.is_idle(), "the outcome is still pending");
    config_set(&mut admin, "maxmemory", "0");
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert!(world.processing_items().is_empty());
    assert_serves_next(&world, &rec, "after-oom");
    let stats = stop(worker);
    assert_eq!(stats.completed, 2, "{stats:?}");
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    drop(world);
    redis.stop();
    Ok(())
}

#[test]
fn an_oversized_item_fails_once_unparsed_and_the_worker_keeps_serving() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop"], fake());
    let id = unique("huge");
    world.track_task(&id);
    // 2 MiB: a valid task padded with one huge member (over the 1 MiB default).
    let huge = format!(
        r#"{{"task_id":"{id}","session_id":"s-huge","ref_image_id":"{}","audio_id":"{}","pad":"{}"}}"#,
        world.image_id,
        world.audio_id,
        "x".repeat(2 << 20)
    );
    world.push_raw(huge.as_bytes());
    let failed = rec.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.code, Some(ErrorCode::InvalidTask));
    assert_eq!(failed.session_id, "s-huge");
    let reason = failed.error.clone().unwrap_or_default();
    assert!(
        reason.contains("bytes") && reason.contains("not parsed"),
        "{reason}"
    );
    assert_serves_next(&world, &rec, "after-huge");
    stop(worker);
    assert_eq!(rec.terminal_count(&id), 1);
    let dead = world.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].payload_truncated,
        "the dead letter keeps only the start"
    );
    assert!(dead[0].payload.len() <= echomimic_protocol::queue::DEAD_LETTER_PAYLOAD_MAX);
    assert_eq!(dead[0].task_id.as_deref(), Some(id.as_str()));
    Ok(())
}

#[test]
fn an_outcome_for_a_claim_recovered_elsewhere_is_not_published() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let (worker, task) = start_with_running_task(&world, &rec, &unique("gone"), 3);
    // Someone else recovered the claim (as a sweeper does for a worker it believes dead).
    let raw = world.processing_items().pop().expect("claimed");
    let _: i64 = world
        .con()
        .lrem(keys::processing_list(world.gpu_id), 1, &raw)?;
    wait_until("the outcome to be settled", Duration::from_secs(30), || {
        worker.is_idle()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rec.terminal_count(&task.task_id),
        0,
        "{:#?}",
        rec.of(&task.task_id)
    );
    assert!(world.result(&task.task_id).is_none());
    assert_serves_next(&world, &rec, "after-gone");
    let stats = stop(worker);
    assert_eq!(stats.completed, 1, "{stats:?}");
    Ok(())
}

#[test]
fn a_lease_deleted_mid_task_is_taken_again_and_the_outcome_recorded() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let (worker, task) = start_with_running_task(&world, &rec, &unique("no-lease"), 2);
    // Redis lost the key (a restart without persistence, a FLUSHDB of the wrong database).
    let _: i64 = world.con().del(keys::worker_lease(world.gpu_id))?;
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed);
    assert!(world.lease().is_some(), "taken again by the heartbeat");
    stop(worker);
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    Ok(())
}

#[test]
fn a_restart_takes_over_the_lease_of_a_dead_process_at_once_and_sweeps_its_folders() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    // A predecessor on this host, pid 999999999 (above any pid_max): gone for sure, but its
    // lease has a minute left and its task folder is still on disk.
    let dead = format!("{}:999999999:0123456789ab", host());
    let _: () = world
        .con()
        .set_ex(keys::worker_lease(world.gpu_id), &dead, 60)?;
    let work = world.dir.path().join("work");
    let left = work.join("echomimic-999999999-abcdef12-xyz");
    std::fs::create_dir_all(&left)?;
    std::fs::write(left.join("image.png"), b"left behind")?;
    let live = work.join(format!("echomimic-{}-abcdef12-xyz", std::process::id()));
    std::fs::create_dir_all(&live)?;
    let t = Instant::now();
    let worker = start(&world, &["--geometry", "crop"], fake());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "did not wait for the lease"
    );
    assert_ne!(world.lease().as_deref(), Some(dead.as_str()));
    assert!(!left.exists(), "the dead process's folder is swept");
    assert!(live.exists(), "a live process's folder is kept");
    stop(worker);
    Ok(())
}

#[test]
fn a_restart_waits_out_a_lease_left_on_another_host() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let _: () = world.con().set_ex(
        keys::worker_lease(world.gpu_id),
        "another-host:42:0123456789ab",
        2,
    )?;
    let t = Instant::now();
    let worker = start(&world, &["--geometry", "crop"], fake());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "took the lease of a possibly live worker after {waited:?}"
    );
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    assert!(world
        .lease()
        .is_some_and(|l| !l.starts_with("another-host:")));
    stop(worker);
    Ok(())
}

#[test]
fn only_the_task_that_was_running_is_charged_for_a_crash() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    // A previous run died holding two items: one on the model (on its last attempt), one
    // prefetched and waiting, itself already retried once (an innocent bystander then too).
    let running = world.task(&unique("was-running"));
    let waiting = world.task(&unique("was-waiting"));
    world.track_task(&running.task_id);
    world.track_task(&waiting.task_id);
    let envelope = |t: &echomimic_protocol::Task| {
        QueueItem::parse(
            QueueItem::parse(t.to_json().as_bytes())
                .requeued("earlier crash")
                .unwrap()
                .as_bytes(),
        )
    };
    let (running_item, waiting_item) = (envelope(&running), envelope(&waiting));
    let mut con = world.con();
    let list = keys::processing_list(world.gpu_id);
    let _: u64 = con.rpush(&list, running_item.raw())?;
    let _: u64 = con.rpush(&list, waiting_item.raw())?;
    let _: u64 = con.hset(
        keys::worker_active(world.gpu_id),
        "dead-claim",
        running_item.raw(),
    )?;
    let worker = start(
        &world,
        &["--geometry", "crop", "--max-attempts", "2"],
        fake(),
    );
    let given_up = rec.wait_terminal(&running.task_id, Duration::from_secs(30));
    assert_eq!(given_up.code, Some(ErrorCode::AttemptsExhausted));
    let done = rec.wait_terminal(&waiting.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let claimed = rec.claims(&waiting.task_id);
    assert_eq!(claimed, vec!["task claimed (attempt 2 of 2)"]);
    let stats = stop(worker);
    assert_eq!(stats.recovered, 2);
    let active: bool = world.con().exists(keys::worker_active(world.gpu_id))?;
    assert!(!active, "the marks are cleared");
    Ok(())
}

#[test]
fn an_item_whose_claim_reply_was_lost_is_requeued_by_the_sweep() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop", "--sweep-secs", "1"], fake());
    // What a BLMOVE whose reply never arrived leaves: the item in our processing list, and no
    // claim of it in the worker.
    let task = world.task(&unique("lost-reply"));
    world.track_task(&task.task_id);
    let _: u64 = world
        .con()
        .rpush(keys::processing_list(world.gpu_id), task.to_json())?;
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let claimed = rec.claims(&task.task_id);
    assert_eq!(claimed, vec!["task claimed (attempt 1 of 2)"], "uncounted");
    let stats = stop(worker);
    assert_eq!(stats.recovered, 1, "{stats:?}");
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    Ok(())
}

#[test]
fn a_claim_reply_lost_on_the_wire_is_requeued_by_the_sweep_and_served_once() -> TestResult {
    // A real BLMOVE whose reply a proxy swallows before cutting the connection: the item is
    // in our processing list, the worker never got it.
    let Some(redis_server) = PrivateRedis::start() else {
        return Ok(());
    };
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", redis_server.port).parse()?;
    let proxy = echomimic_testkit::peers::ReplyDroppingProxy::start(upstream, "BLMOVE");
    let world = World::with_redis(&format!("redis://{}/0", proxy.addr()));
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop", "--sweep-secs", "1"], fake());
    proxy.arm();
    let task = world.task(&unique("wire-lost-reply"));
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert_eq!(proxy.dropped(), 1, "the reply was dropped once");
    assert_eq!(
        rec.claims(&task.task_id),
        vec!["task claimed (attempt 1 of 2)"],
        "uncounted"
    );
    let stats = stop(worker);
    assert_eq!(stats.recovered, 1, "{stats:?}");
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    assert!(world.processing_items().is_empty());
    Ok(())
}

#[test]
fn the_claims_of_a_dead_worker_on_the_same_queue_are_requeued_by_the_sweep() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let (dead, live, foreign) = (unique_gpu(), unique_gpu(), unique_gpu());
    {
        let mut k = world.extra_keys.lock().unwrap();
        for g in [dead, live, foreign] {
            k.extend([
                keys::processing_list(g),
                keys::worker_lease(g),
                keys::worker_active(g),
                keys::worker_queue(g),
                keys::gpu_status(g),
            ]);
        }
    }
    let mut con = world.con();
    // `dead` served this queue and died running `orphan` (lease expired, nobody restarted it).
    let orphan = world.task(&unique("orphan"));
    world.track_task(&orphan.task_id);
    let _: () = con.set(keys::worker_queue(dead), &world.queue)?;
    let _: u64 = con.rpush(keys::processing_list(dead), orphan.to_json())?;
    let _: u64 = con.hset(keys::worker_active(dead), "c", orphan.to_json())?;
    // `live` serves this queue and is alive; `foreign` is dead but served another queue.
    let busy = world.task(&unique("live-peer"));
    let _: () = con.set(keys::worker_queue(live), &world.queue)?;
    let _: () = con.set_ex(keys::worker_lease(live), "elsewhere:1:abc", 60)?;
    let _: u64 = con.rpush(keys::processing_list(live), busy.to_json())?;
    let other = world.task(&unique("foreign"));
    let _: () = con.set(keys::worker_queue(foreign), "some-other-queue")?;
    let _: u64 = con.rpush(keys::processing_list(foreign), other.to_json())?;

    let worker = start(&world, &["--geometry", "crop", "--sweep-secs", "1"], fake());
    let done = rec.wait_terminal(&orphan.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let claimed = rec.claims(&orphan.task_id);
    assert_eq!(
        claimed,
        vec!["task claimed (attempt 2 of 2)"],
        "it was running"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let left: Vec<Vec<u8>> = con.lrange(keys::processing_list(live), 0, -1)?;
    assert_eq!(left.len(), 1, "a live worker's claim is left alone");
    let left: Vec<Vec<u8>> = con.lrange(keys::processing_list(foreign), 0, -1)?;
    assert_eq!(left.len(), 1, "another queue's claims are left alone");
    let lease: Option<String> = con.get(keys::worker_lease(dead))?;
    assert_eq!(lease, None, "the swept lease is released");
    stop(worker);
    Ok(())
}

#[test]
fn a_panicking_thread_stops_the_worker_with_an_error_and_its_task_is_recovered() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake();
    engine.panic_in_next_prepares(1);
    let worker = start(&world, &["--geometry", "crop"], engine);
    let task = world.task(&unique("panic"));
    world.submit(&task);
    // The fetcher dies preparing the task: the worker must end, with an error.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(worker.join());
    });
    let ended = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the worker stops after a thread died");
    let err = ended.expect_err("a dead thread ends the worker with an error");
    assert!(err.to_string().contains("fetcher"), "{err}");
    assert_eq!(err.exit_code(), 1);
    assert_eq!(rec.terminal_count(&task.task_id), 0);
    assert_eq!(world.processing_items().len(), 1, "the task is kept");
    // Its supervisor restarts it: the task, charged one attempt, completes.
    let again = start(&world, &["--geometry", "crop"], fake());
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let claimed = rec.claims(&task.task_id);
    assert_eq!(
        claimed,
        vec![
            "task claimed (attempt 1 of 2)",
            "task claimed (attempt 2 of 2)"
        ]
    );
    stop(again);
    Ok(())
}

#[test]
fn a_200_response_carrying_html_fails_as_bad_input_without_local_paths() -> TestResult {
    let Some(mut world) = World::new() else {
        return Ok(());
    };
    // A captive portal or misrouted proxy: every request answers 200 with a sign-in page.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let portal = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let body = "<!doctype html><html><body><form>Sign in</form></body></html>";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    world.stop_server();
    world.base_url = portal.clone();
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop"], fake());
    let task = world.task(&unique("portal"));
    world.submit(&task);
    let failed = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(failed.status, Status::Failed, "{failed:?}");
    assert_eq!(failed.code, Some(ErrorCode::BadInput), "{failed:?}");
    let text = failed.error.unwrap_or_default();
    let work = world.dir.path().display().to_string();
    assert!(!text.contains(&work), "the local path leaks: {text}");
    stop(worker);
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    Ok(())
}

type Joined = Result<echomimic_worker::Stats, echomimic_worker::WorkerError>;

/// Joins `worker` on a helper thread (supervision, the watchdog included, runs inside
/// `join`, as in the binary's `main`); the receiver gets the result.
fn join_later(worker: echomimic_worker::Worker) -> std::sync::mpsc::Receiver<Joined> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(worker.join());
    });
    rx
}

/// The result of a join, and how long it took, within `limit`.
fn joined_within(rx: &std::sync::mpsc::Receiver<Joined>, limit: Duration) -> (Joined, Duration) {
    let t = Instant::now();
    let ended = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the worker did not stop within {limit:?}"));
    (ended, t.elapsed())
}

/// Joins `worker`: the result, and how long the join took, within `limit`.
fn join_within(worker: echomimic_worker::Worker, limit: Duration) -> (Joined, Duration) {
    joined_within(&join_later(worker), limit)
}

#[test]
fn a_model_call_that_hangs_is_requeued_once_and_the_worker_exits_for_its_supervisor() -> TestResult
{
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let flags = [
        "--geometry",
        "crop",
        "--watchdog-secs",
        "2",
        "--stop-timeout-secs",
        "2",
        "--max-attempts",
        "3",
    ];
    // The engine hangs in its first UNet call, twice (shared by both workers below).
    let engine = fake().with_call_delay(Duration::from_millis(50));
    engine.hang_in_next_runs(2);
    let task = world.task(&unique("hang"));
    let worker = join_later(start(&world, &flags, engine.clone()));
    world.submit(&task);
    let (ended, took) = joined_within(&worker, Duration::from_secs(20));
    let err = ended.expect_err("a hung model ends the worker with an error");
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(err.to_string().contains("watchdog"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // Requeued once, the attempt counted and the reason kept; nothing published as final.
    assert_eq!(rec.terminal_count(&task.task_id), 0);
    let items = world.queue_items();
    assert_eq!(items.len(), 1);
    let item = QueueItem::parse(&items[0]);
    assert_eq!(item.attempts(), 1);
    assert!(
        item.last_error().is_some_and(|e| e.contains("watchdog")),
        "{:?}",
        item.last_error()
    );
    assert!(world.processing_items().is_empty());
    assert_eq!(world.lease(), None, "the lease is released for the restart");
    // The supervisor restarts it; the task hangs the model again: failed, not retried forever.
    let worker = join_later(start(&world, &flags, engine.clone()));
    let failed = rec.wait_terminal(&task.task_id, Duration::from_secs(20));
    assert_eq!(failed.status, Status::Failed, "{failed:?}");
    assert_eq!(failed.code, Some(ErrorCode::Internal), "{failed:?}");
    let text = failed.error.unwrap_or_default();
    assert!(text.contains("previous one hung too"), "{text}");
    let (ended, _) = joined_within(&worker, Duration::from_secs(20));
    assert_eq!(ended.expect_err("hung again").exit_code(), 5);
    assert_eq!(
        world
            .dead_letters()
            .iter()
            .filter(|d| d.reason.contains("watchdog"))
            .count(),
        1
    );
    // A healthy model serves the next task.
    let worker = start(&world, &flags, fake());
    assert_serves_next(&world, &rec, "after-hang");
    stop(worker);
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    Ok(())
}

/// A worker downloading `task` from a stalling peer, stopped with one signal: returns how long
/// the stop took.
fn stop_while_downloading(every: Option<Duration>) -> Option<Duration> {
    let mut world = World::new()?;
    world.stop_server();
    world.base_url = format!(
        "http://{}",
        echomimic_testkit::peers::stalling_http_peer(every)
    );
    let rec = world.recorder();
    let worker = start(
        &world,
        &["--grace-secs", "1", "--stop-timeout-secs", "2"],
        fake(),
    );
    let task = world.task(&unique("stall"));
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Downloading, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    worker.shutdown_handle().request();
    let (ended, took) = join_within(worker, Duration::from_secs(20));
    ended.expect("a stop is a clean stop");
    world.assert_requeued_after_stop(&rec, &task);
    Some(took)
}

#[test]
fn a_stop_while_a_peer_trickles_bytes_cancels_the_download_at_once() {
    let Some(took) = stop_while_downloading(Some(Duration::from_millis(100))) else {
        return;
    };
    // The next byte ends the download; no grace period or stop timeout is needed (the
    // silent peer below takes at least 5 s).
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn a_stop_while_a_peer_sends_nothing_ends_within_grace_and_twice_the_stop_timeout() {
    let Some(took) = stop_while_downloading(None) else {
        return;
    };
    // Grace 1 s, then 2 s for the fetcher before the cancel, then 2 s before the stuck
    // download is left behind (its task requeued by the supervisor).
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(12),
        "took {took:?}"
    );
}
