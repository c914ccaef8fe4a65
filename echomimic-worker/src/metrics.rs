//! The worker's Prometheus metrics (served by [`crate::health`] on `--metrics-listen`).
//!
//! Every metric is named `echomimic_*`; the set, with what each means, is listed in the
//! worker's README. Counters and histograms are updated by the threads as things happen
//! (an atomic add, never a lock held across I/O); the gauges that describe Redis (queue depth,
//! processing list) and the accelerator are read when a scrape asks for them, by the metrics
//! thread, so a scrape never waits on the model and the model never waits on a scrape.
//!
//! A leaf module: it imports nothing of this crate.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The stages of a task whose durations are observed ([`Metrics::stage`]), in the order of
/// the task's life.
pub(crate) const STAGES: [&str; 7] = [
    "download",
    "face",
    "wait",
    "inference",
    "decode",
    "mux",
    "upload",
];

/// Buckets of the stage histograms: 10 ms to 30 min.
const STAGE_BUCKETS: [f64; 15] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Buckets of the UNet-call histogram: 5 ms (a small GPU call) to 2 min (a CPU call at the
/// released widths).
const UNET_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

/// Version of this binary (`Cargo.toml`) and the commit it was built from (`build.rs`).
pub(crate) fn version_and_commit() -> (&'static str, &'static str) {
    (env!("CARGO_PKG_VERSION"), env!("ECHOMIMIC_GIT_HASH"))
}

/// The worker's metrics and their registry.
pub(crate) struct Metrics {
    registry: Registry,
    tasks: IntCounterVec,
    stage_seconds: HistogramVec,
    unet_call_seconds: Histogram,
    pub(crate) claims_in_flight: IntGauge,
    task_retries: IntCounter,
    dead_letters: IntCounter,
    pub(crate) redis_reconnects: IntCounter,
    model_load_seconds: Gauge,
    build_info: IntGaugeVec,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) delayed_tasks: IntGaugeVec,
    pub(crate) processing_length: IntGaugeVec,
    pub(crate) redis_up: IntGauge,
    pub(crate) gpu_memory_used: IntGauge,
    pub(crate) up: IntGaugeVec,
}

/// `metric`, registered in `registry`. Only fails on an invalid name or a duplicate
/// registration: a bug the tests catch.
fn registered<C>(registry: &Registry, metric: prometheus::Result<C>) -> C
where
    C: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.unwrap_or_else(|e| panic!("metric definition: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    metric
}

impl Metrics {
    /// A fresh registry with every metric defined (and zero).
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let tasks = registered(&registry, IntCounterVec::new(
            Opts::new(
                "echomimic_tasks_total",
                "Task outcomes recorded: completed, failed (with a failed event or only a dead \
                 letter), requeued (another attempt, or given back on a stop); code is the \
                 error code behind a failure or a retry (none otherwise).",
            ),
            &["outcome", "code"],
        ));
        let stage_seconds = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "echomimic_stage_seconds",
                    "Seconds per stage of a completed task: download (inputs), face (detection \
                 and audio checks), wait (prepared, waiting for the model), inference (to the \
                 last UNet call), decode (VAE and frames), mux (encoding and audio), upload.",
                )
                .buckets(STAGE_BUCKETS.to_vec()),
                &["stage"],
            ),
        );
        let unet_call_seconds = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "echomimic_unet_call_seconds",
                    "Seconds between two consecutive context windows' denoising UNet results of \
                 a run (CFG batch included; windows run together in one call count the call's \
                 time on the first of them and about 0 on the others).",
                )
                .buckets(UNET_BUCKETS.to_vec()),
            ),
        );
        let claims_in_flight = registered(
            &registry,
            IntGauge::new(
                "echomimic_claims_in_flight",
                "Queue items claimed and not yet settled (downloading, prepared, on the model, \
             finishing).",
            ),
        );
        let task_retries = registered(
            &registry,
            IntCounter::new(
                "echomimic_task_retries_total",
                "Tasks requeued for another attempt after a transient failure (attempt counted).",
            ),
        );
        let dead_letters = registered(
            &registry,
            IntCounter::new(
                "echomimic_dead_letters_total",
                "Dead letters written to task_dead_letter.",
            ),
        );
        let redis_reconnects = registered(
            &registry,
            IntCounter::new(
                "echomimic_redis_reconnects_total",
                "Redis connections lost and made again, over all of the worker's connections.",
            ),
        );
        let model_load_seconds = registered(
            &registry,
            Gauge::new(
                "echomimic_model_load_seconds",
                "Seconds the model took to load and warm up at start (0 while loading).",
            ),
        );
        let build_info = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "echomimic_build_info",
                    "Always 1: the binary's version and commit, and the model's device, dtype and \
                 variant.",
                ),
                &["version", "git_hash", "device", "dtype", "variant"],
            ),
        );
        let queue_depth = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "echomimic_queue_depth",
                    "Items waiting in the served queue (read from Redis at scrape time).",
                ),
                &["queue"],
            ),
        );
        let delayed_tasks = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "echomimic_delayed_tasks",
                    "Tasks of the served queue put aside during a temp-file outage \
                     (task_delayed:{queue}, read from Redis at scrape time).",
                ),
                &["queue"],
            ),
        );
        let processing_length = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "echomimic_processing_length",
                    "Items in this worker's processing list (read from Redis at scrape time).",
                ),
                &["list"],
            ),
        );
        let redis_up = registered(
            &registry,
            IntGauge::new(
                "echomimic_redis_up",
                "1 when the last scrape reached Redis within its timeout, else 0.",
            ),
        );
        let gpu_memory_used = registered(
            &registry,
            IntGauge::new(
                "echomimic_gpu_memory_used_bytes",
                "Bytes of the CUDA device's memory in use (all processes: total minus free); 0 on \
             the CPU.",
            ),
        );
        let up = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "echomimic_up",
                    "1 when the check holds: live (every thread alive) and ready (model loaded, \
                 Redis reachable, lease held), as /healthz and /readyz answer.",
                ),
                &["check"],
            ),
        );
        for stage in STAGES {
            stage_seconds.with_label_values(&[stage]);
        }
        tasks.with_label_values(&["completed", "none"]);
        Metrics {
            registry,
            tasks,
            stage_seconds,
            unet_call_seconds,
            claims_in_flight,
            task_retries,
            dead_letters,
            redis_reconnects,
            model_load_seconds,
            build_info,
            queue_depth,
            delayed_tasks,
            processing_length,
            redis_up,
            gpu_memory_used,
            up,
        }
    }

    /// An outcome was recorded: `outcome` is `completed`, `failed` or `requeued`, `code` the
    /// wire error code (or `none`).
    pub(crate) fn task(&self, outcome: &str, code: &str, retry: bool, dead_letter: bool) {
        self.tasks.with_label_values(&[outcome, code]).inc();
        if retry {
            self.task_retries.inc();
        }
        if dead_letter {
            self.dead_letters.inc();
        }
    }

    /// One stage of a task took `secs` (`stage` is one of [`STAGES`]).
    pub(crate) fn stage(&self, stage: &str, secs: f64) {
        self.stage_seconds.with_label_values(&[stage]).observe(secs);
    }

    /// One UNet call took `secs`.
    pub(crate) fn unet_call(&self, secs: f64) {
        self.unet_call_seconds.observe(secs);
    }

    /// The model is loaded (and warmed up) after `secs`.
    pub(crate) fn model_loaded(&self, secs: f64, device: &str, dtype: &str, variant: &str) {
        self.model_load_seconds.set(secs);
        let (version, commit) = version_and_commit();
        self.build_info
            .with_label_values(&[version, commit, device, dtype, variant])
            .set(1);
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding the metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_help_and_type() {
        let m = Metrics::new();
        m.task("failed", "no_face", false, true);
        m.task("requeued", "unavailable", true, false);
        m.stage("download", 0.2);
        m.unet_call(0.5);
        m.model_loaded(1.5, "cpu", "f32", "acc");
        m.queue_depth.with_label_values(&["q"]).set(3);
        m.processing_length.with_label_values(&["p"]).set(1);
        m.delayed_tasks.with_label_values(&["q"]).set(2);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "echomimic_tasks_total",
            "echomimic_stage_seconds",
            "echomimic_unet_call_seconds",
            "echomimic_claims_in_flight",
            "echomimic_task_retries_total",
            "echomimic_dead_letters_total",
            "echomimic_redis_reconnects_total",
            "echomimic_model_load_seconds",
            "echomimic_build_info",
            "echomimic_queue_depth",
            "echomimic_delayed_tasks",
            "echomimic_processing_length",
            "echomimic_redis_up",
            "echomimic_gpu_memory_used_bytes",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        assert!(text.contains(r#"echomimic_tasks_total{code="no_face",outcome="failed"} 1"#));
        assert!(text.contains("echomimic_task_retries_total 1"));
        assert!(text.contains("echomimic_dead_letters_total 1"));
        assert!(text.contains(r#"echomimic_stage_seconds_count{stage="download"} 1"#));
        assert!(text.contains(r#"echomimic_stage_seconds_count{stage="upload"} 0"#));
        assert!(text.contains(r#"variant="acc""#) && text.contains(r#"device="cpu""#));
        assert!(text.contains(r#"echomimic_queue_depth{queue="q"} 3"#));
        assert!(text.contains(r#"echomimic_delayed_tasks{queue="q"} 2"#));
    }
}
