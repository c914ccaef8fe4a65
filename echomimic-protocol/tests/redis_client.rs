//! Client helpers against a real Redis (default `redis://127.0.0.1:6379/11`, override with
//! `ECHOMIMIC_TEST_REDIS_URL`). Each test uses its own queue, channel and task ids, and deletes
//! its keys. When no Redis answers, each test prints why and returns, unless
//! `ECHOMIMIC_REQUIRE_REDIS` is set (CI sets it), in which case it fails.

use std::time::{Duration, Instant};

use echomimic_protocol::client::{self, FollowOptions};
use echomimic_protocol::{
    keys, ErrorCode, LegacyEvent, ProgressEvent, ProtocolError, Stage, Status, Task, WorkerState,
};
use echomimic_testkit::redis::{Cleanup, TestRedis};
use redis::Commands;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Database 11 by default (the worker's tests use 12), `ECHOMIMIC_TEST_REDIS_URL` to point
/// elsewhere.
const TEST_REDIS: TestRedis = TestRedis {
    env_var: "ECHOMIMIC_TEST_REDIS_URL",
    default_url: "redis://127.0.0.1:6379/11",
};

/// A client and a fresh connection, or `None` (with a message) when no Redis answers.
fn redis() -> Option<(redis::Client, redis::Connection)> {
    let client = TEST_REDIS.client()?;
    let con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("Redis answered a moment ago");
    Some((client, con))
}

/// A name unique to this test run and call.
fn unique(what: &str) -> String {
    echomimic_testkit::redis::unique("emtest", what)
}

fn task(id: &str) -> Task {
    Task::new(
        id,
        "sess-1",
        "550e8400-e29b-41d4-a716-446655440000",
        "661f9511-f3ac-52e5-b827-557766551111",
    )
}

/// Publishes `messages` on `channel` once `follow_task` has subscribed.
fn publish_when_subscribed(
    client: &redis::Client,
    channel: &str,
    messages: Vec<String>,
) -> std::thread::JoinHandle<()> {
    let client = client.clone();
    let channel = channel.to_owned();
    std::thread::spawn(move || {
        let mut con = client.get_connection().expect("publisher connection");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query(&mut con)
                .expect("PUBSUB NUMSUB");
            if counts.first().is_some_and(|(_, n)| *n > 0) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for m in messages {
            let _: u64 = con.publish(&channel, m).expect("publish");
        }
    })
}

#[test]
fn submit_task_pushes_in_order_and_clears_stale_keys() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    let queue = unique("queue");
    let t1 = task(&unique("task"));
    let t2 = task(&unique("task"));
    let _cleanup = Cleanup::new(
        client.clone(),
        vec![
            queue.clone(),
            keys::task_result(&t1.task_id),
            keys::latest_event(&t1.task_id),
        ],
    );
    // A stale result from an earlier run with the same id.
    let _: () = con.set(
        keys::task_result(&t1.task_id),
        ProgressEvent::completed(&t1.task_id, "old", "v", "x").to_json(),
    )?;
    let _: () = con.set(keys::latest_event(&t1.task_id), "{}")?;

    assert_eq!(client::submit_task(&mut con, &queue, &t1)?, 1);
    assert_eq!(client::submit_task(&mut con, &queue, &t2)?, 2);

    let items: Vec<String> = con.lrange(&queue, 0, -1)?;
    assert_eq!(items.len(), 2);
    assert_eq!(Task::from_json(items[0].as_bytes())?, t1);
    assert_eq!(Task::from_json(items[1].as_bytes())?, t2);
    assert!(client::read_result(&mut con, &t1.task_id)?.is_none());
    assert!(client::read_latest_event(&mut con, &t1.task_id)?.is_none());
    Ok(())
}

#[test]
fn submit_task_rejects_an_invalid_task_and_pushes_nothing() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    let queue = unique("queue");
    let _cleanup = Cleanup::new(client, vec![queue.clone()]);
    let mut bad = task(&unique("task"));
    bad.audio_id = "http://example.invalid/a.wav".into();
    let err = client::submit_task(&mut con, &queue, &bad).unwrap_err();
    assert!(
        matches!(err, ProtocolError::InvalidTask(ref e) if e.field() == Some("audio_id")),
        "{err}"
    );
    let len: u64 = con.llen(&queue)?;
    assert_eq!(len, 0);
    Ok(())
}

#[test]
fn follow_task_reports_own_events_until_terminal() -> TestResult {
    let Some((client, _con)) = redis() else {
        return Ok(());
    };
    let channel = unique("chan");
    let id = unique("task");
    let other = unique("task");
    let messages = vec![
        ProgressEvent::stage(&other, "s", Stage::Inference, 10.0, "not ours").to_json(),
        ProgressEvent::stage(&id, "s", Stage::Processing, 0.0, "claimed").to_json(),
        "this is not json".to_owned(),
        ProgressEvent::stage(&id, "s", Stage::Inference, 50.0, "step 3/6").to_json(),
        ProgressEvent::completed(&other, "s", "v-other", "not ours").to_json(),
        ProgressEvent::completed(&id, "s", "v-1", "done").to_json(),
        ProgressEvent::stage(&id, "s", Stage::Inference, 60.0, "after terminal").to_json(),
    ];
    let publisher = publish_when_subscribed(&client, &channel, messages);
    let opts = FollowOptions {
        channel,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let last = client::follow_task(&client, &id, &opts, |e| {
        seen.push((e.status, e.message.clone()))
    })?;
    publisher.join().map_err(|_| "publisher panicked")?;
    assert_eq!(last.status, Status::Completed);
    assert_eq!(last.video_file_id.as_deref(), Some("v-1"));
    assert_eq!(
        seen,
        vec![
            (Status::Processing, Some("claimed".into())),
            (Status::Inference, Some("step 3/6".into())),
            (Status::Completed, Some("done".into())),
        ]
    );
    Ok(())
}

#[test]
fn follow_task_understands_the_legacy_schema() -> TestResult {
    let Some((client, _con)) = redis() else {
        return Ok(());
    };
    let channel = unique("chan");
    let id = unique("task");
    let events = [
        ProgressEvent::stage(&id, "s", Stage::Processing, 0.0, "claimed"),
        ProgressEvent::stage(&id, "s", Stage::Inference, 40.0, "running"),
        ProgressEvent::failed(&id, "s", ErrorCode::NoFace, "no face found"),
    ];
    let messages = events
        .iter()
        .map(|e| LegacyEvent::from_event(e).to_json())
        .collect();
    let publisher = publish_when_subscribed(&client, &channel, messages);
    let opts = FollowOptions {
        channel,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let mut progress = Vec::new();
    let last = client::follow_task(&client, &id, &opts, |e| progress.push(e.progress))?;
    publisher.join().map_err(|_| "publisher panicked")?;
    assert_eq!(last.status, Status::Failed);
    assert_eq!(last.code, Some(ErrorCode::NoFace));
    assert_eq!(last.error.as_deref(), Some("no face found"));
    assert_eq!(progress, vec![None, Some(40.0), None]);
    Ok(())
}

#[test]
fn late_follower_gets_the_persisted_result_at_once() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    let id = unique("task");
    let _cleanup = Cleanup::new(
        client.clone(),
        vec![keys::task_result(&id), keys::latest_event(&id)],
    );
    let done = ProgressEvent::completed(&id, "s", "v-9", "done");
    let _: () = con.set(keys::latest_event(&id), done.to_json())?;
    let _: () = con.set(keys::task_result(&id), done.to_json())?;
    let opts = FollowOptions {
        channel: unique("chan"),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let started = Instant::now();
    let mut calls = 0;
    let last = client::follow_task(&client, &id, &opts, |_| calls += 1)?;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(last, done);
    assert_eq!(calls, 1);
    assert_eq!(client::read_result(&mut con, &id)?, Some(done));
    Ok(())
}

#[test]
fn follower_on_the_wrong_channel_still_finishes_by_rechecking() -> TestResult {
    let Some((client, _con)) = redis() else {
        return Ok(());
    };
    let id = unique("task");
    let _cleanup = Cleanup::new(client.clone(), vec![keys::task_result(&id)]);
    let writer = {
        let client = client.clone();
        let id = id.clone();
        std::thread::spawn(move || -> redis::RedisResult<()> {
            std::thread::sleep(Duration::from_millis(300));
            let mut con = client.get_connection()?;
            con.set(
                keys::task_result(&id),
                LegacyEvent::from_event(&ProgressEvent::completed(&id, "s", "v", "ok")).to_json(),
            )
        })
    };
    let opts = FollowOptions {
        channel: unique("chan"),
        timeout: Duration::from_secs(10),
        recheck_interval: Duration::from_millis(200),
    };
    let last = client::follow_task(&client, &id, &opts, |_| {})?;
    writer.join().map_err(|_| "writer panicked")??;
    assert_eq!(last.status, Status::Completed);
    assert_eq!(last.video_file_id.as_deref(), Some("v"));
    Ok(())
}

#[test]
fn follow_task_times_out_with_the_last_event() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    let id = unique("task");
    let _cleanup = Cleanup::new(client.clone(), vec![keys::latest_event(&id)]);
    let latest = ProgressEvent::stage(&id, "s", Stage::Inference, 33.0, "stuck");
    let _: () = con.set(keys::latest_event(&id), latest.to_json())?;
    let opts = FollowOptions {
        channel: unique("chan"),
        timeout: Duration::from_millis(400),
        recheck_interval: Duration::from_millis(100),
    };
    let started = Instant::now();
    let err = client::follow_task(&client, &id, &opts, |_| {}).unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    match err {
        ProtocolError::FollowTimeout { task_id, last, .. } => {
            assert_eq!(task_id, id);
            assert_eq!(last.as_deref(), Some(&latest));
        }
        other => panic!("expected a timeout, got {other}"),
    }
    Ok(())
}

#[test]
fn worker_state_is_read_from_gpu_status() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    // High GPU ids that no real worker uses, in the test database.
    let gpu = 900_000 + (std::process::id() % 50_000);
    let _cleanup = Cleanup::new(client, vec![keys::gpu_status(gpu)]);
    assert_eq!(client::read_worker_state(&mut con, gpu)?, None);
    let _: () = con.set(keys::gpu_status(gpu), "busy")?;
    assert_eq!(
        client::read_worker_state(&mut con, gpu)?,
        Some(WorkerState::Busy)
    );
    let _: () = con.set(keys::gpu_status(gpu), "idle")?;
    assert_eq!(
        client::read_worker_state(&mut con, gpu)?,
        Some(WorkerState::Idle)
    );
    let _: () = con.set(keys::gpu_status(gpu), "rebooting")?;
    assert_eq!(
        client::read_worker_state(&mut con, gpu)?,
        Some(WorkerState::Unknown)
    );
    Ok(())
}

#[test]
fn connection_info_selects_db_and_ignores_empty_password() -> TestResult {
    let info = client::connection_info("127.0.0.1", 6379, 11, Some(""))?;
    assert_eq!(info.redis_settings().db(), 11);
    assert_eq!(info.redis_settings().password(), None);
    let info = client::connection_info("127.0.0.1", 6379, 0, Some("s3cret"))?;
    assert_eq!(info.redis_settings().password(), Some("s3cret"));
    if redis().is_some() {
        let client = redis::Client::open(client::connection_info("127.0.0.1", 6379, 11, None)?)?;
        let mut con = client.get_connection()?;
        let pong: String = redis::cmd("PING").query(&mut con)?;
        assert_eq!(pong, "PONG");
    }
    Ok(())
}

#[test]
fn redis_settings_carry_an_acl_user_and_tls() -> TestResult {
    let settings = client::RedisSettings {
        host: "::1",
        port: 6380,
        db: 3,
        username: Some("worker"),
        password: Some("s3cret"),
        tls: true,
    };
    let info = settings.connection_info()?;
    assert_eq!(info.redis_settings().username(), Some("worker"));
    assert_eq!(info.redis_settings().password(), Some("s3cret"));
    assert_eq!(info.redis_settings().db(), 3);
    match info.addr() {
        redis::ConnectionAddr::TcpTls { host, port, .. } => {
            assert_eq!((host.as_str(), *port), ("::1", 6380));
        }
        other => panic!("expected TLS, got {other:?}"),
    }
    let plain = client::RedisSettings {
        username: Some(""),
        tls: false,
        ..settings
    }
    .connection_info()?;
    assert_eq!(plain.redis_settings().username(), None);
    assert!(matches!(plain.addr(), redis::ConnectionAddr::Tcp(..)));
    Ok(())
}

#[test]
fn cancel_task_removes_a_queued_task_signals_a_claimed_one_and_leaves_the_rest() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    let queue = unique("queue");
    let channel = unique("chan");
    let processing = format!(
        "{}{}",
        keys::PROCESSING_LIST_PREFIX,
        unique("gpu").replace(':', "-")
    );
    let queued = task(&unique("task"));
    let claimed = task(&unique("task"));
    let mut names = vec![queue.clone(), processing.clone()];
    for t in [&queued, &claimed] {
        names.extend([
            keys::task_result(&t.task_id),
            keys::latest_event(&t.task_id),
            keys::task_cancel(&t.task_id),
        ]);
    }
    let _cleanup = Cleanup::new(client.clone(), names);
    client::submit_task(&mut con, &queue, &queued)?;
    let _: () = con.rpush(&processing, claimed.to_json())?;
    let opts = client::CancelOptions {
        channel: channel.clone(),
        queues: vec![queue.clone()],
        ..Default::default()
    };

    // Queued: removed, and its one failed event stored (and published).
    let found = client::cancel_task(&mut con, &queued.task_id, &opts)?;
    let client::Cancellation::Dequeued { queue: from, event } = found else {
        panic!("{found:?}");
    };
    assert_eq!(from, queue);
    assert_eq!(event.code, Some(ErrorCode::Cancelled));
    assert_eq!(event.session_id, "sess-1");
    assert_eq!(con.llen::<_, u64>(&queue)?, 0);
    assert_eq!(
        client::read_result(&mut con, &queued.task_id)?,
        Some(event.clone())
    );
    assert!(!con.exists::<_, bool>(keys::task_cancel(&queued.task_id))?);
    // Again: it is finished now, and nothing changes.
    assert_eq!(
        client::cancel_task(&mut con, &queued.task_id, &opts)?,
        client::Cancellation::Finished(event)
    );

    // Claimed by a worker: the request is left for it.
    assert_eq!(
        client::cancel_task(&mut con, &claimed.task_id, &opts)?,
        client::Cancellation::Requested {
            processing: processing.clone()
        }
    );
    assert!(con.exists::<_, bool>(keys::task_cancel(&claimed.task_id))?);
    assert_eq!(con.llen::<_, u64>(&processing)?, 1);
    // A new submit of the same id clears the old request.
    client::submit_task(&mut con, &queue, &claimed)?;
    assert!(!con.exists::<_, bool>(keys::task_cancel(&claimed.task_id))?);

    // Unknown: nothing written.
    let nobody = unique("task");
    assert_eq!(
        client::cancel_task(&mut con, &nobody, &opts)?,
        client::Cancellation::Unknown
    );
    assert!(!con.exists::<_, bool>(keys::task_cancel(&nobody))?);
    Ok(())
}

#[test]
fn cancel_task_finds_a_task_waiting_out_an_outage_in_the_delayed_set() -> TestResult {
    let Some((client, mut con)) = redis() else {
        return Ok(());
    };
    // A queue no worker announced and whose list is empty: found through its delayed set.
    let queue = unique("queue");
    let delayed = keys::task_delayed(&queue);
    let waiting = task(&unique("task"));
    let twin = waiting.clone();
    let names = vec![
        queue.clone(),
        delayed.clone(),
        keys::task_result(&waiting.task_id),
        keys::latest_event(&waiting.task_id),
        keys::task_cancel(&waiting.task_id),
    ];
    let _cleanup = Cleanup::new(client.clone(), names);
    let item = echomimic_protocol::QueueItem::parse(waiting.to_json().as_bytes());
    let first = item.deferred("temp-file API down", 100, "claim-1").unwrap();
    let second = echomimic_protocol::QueueItem::parse(twin.to_json().as_bytes())
        .deferred("temp-file API down", 100, "claim-2")
        .unwrap();
    let _: () = con.zadd(&delayed, &first, 1)?;
    let _: () = con.zadd(&delayed, &second, 2)?;
    assert!(client::known_queues(&mut con)?.contains(&queue));
    let opts = client::CancelOptions {
        channel: unique("chan"),
        ..Default::default()
    };
    let found = client::cancel_task(&mut con, &waiting.task_id, &opts)?;
    let client::Cancellation::Dequeued { queue: from, event } = found else {
        panic!("{found:?}");
    };
    assert_eq!(from, queue);
    assert_eq!(event.code, Some(ErrorCode::Cancelled));
    // One member went (the one with the lower score comes first), its twin waits on.
    let left: Vec<String> = con.zrange(&delayed, 0, -1)?;
    assert_eq!(left, vec![second]);
    assert_eq!(
        client::read_result(&mut con, &waiting.task_id)?,
        Some(event)
    );
    Ok(())
}
