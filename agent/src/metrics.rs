//! The agent's Prometheus metrics (`/metrics` of the status endpoint):
//! counters bumped as each job ends, gauges read when scraped.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindResult {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Disk {
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Target {
    target: String,
}

/// A job that ended, as the metrics count it.
pub struct Ended<'a> {
    pub kind: &'a str,
    pub target: &'a str,
    pub ok: bool,
    pub seconds: f64,
    pub payload_bytes: u64,
    pub written_bytes: u64,
    pub wire_bytes: u64,
    pub code: Option<&'a str>,
    /// It committed a new point (not one the target already held).
    pub new_point: bool,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    received: Counter,
    sent: Counter,
    written: Counter,
    wire: Counter,
    jobs: Family<KindResult, Counter>,
    duration: Histogram,
    errors: Family<Code, Counter>,
    sessions: Gauge,
    rpo: Family<Disk, Gauge<f64, AtomicU64>>,
    points: Family<Target, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            received: Counter::default(),
            sent: Counter::default(),
            written: Counter::default(),
            wire: Counter::default(),
            jobs: Family::default(),
            duration: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            errors: Family::default(),
            sessions: Gauge::default(),
            rpo: Family::default(),
            points: Family::default(),
            registry: Registry::default(),
        };
        // `_total` is added to counters' names by the encoder.
        registry.register("diskferry_received_bytes", "Block payload received", m.received.clone());
        registry.register("diskferry_sent_bytes", "Block payload sent", m.sent.clone());
        registry.register("diskferry_written_bytes", "Bytes written to target disks", m.written.clone());
        registry.register("diskferry_wire_bytes", "UDP bytes of this agent's pushes, both ways", m.wire.clone());
        registry.register("diskferry_jobs", "Jobs ended, by kind and result", m.jobs.clone());
        registry.register("diskferry_job_duration_seconds", "How long jobs ran", m.duration.clone());
        registry.register("diskferry_errors", "Failed jobs, by error code", m.errors.clone());
        registry.register("diskferry_sessions_active", "Pushes and received sessions running", m.sessions.clone());
        registry.register(
            "diskferry_rpo_seconds",
            "Age of each protected disk's newest consistent point",
            m.rpo.clone(),
        );
        registry.register("diskferry_points_committed", "Points committed, by target name", m.points.clone());
        Metrics { registry, ..m }
    }

    /// Counts a job that ended.
    pub fn job_ended(&self, e: &Ended<'_>) {
        let result = if e.ok { "ok" } else { "failed" };
        self.jobs.get_or_create(&KindResult { kind: e.kind.to_string(), result: result.into() }).inc();
        self.duration.observe(e.seconds);
        match e.kind {
            "receive" => self.received.inc_by(e.payload_bytes),
            _ => self.sent.inc_by(e.payload_bytes),
        };
        self.written.inc_by(e.written_bytes);
        self.wire.inc_by(e.wire_bytes);
        if let Some(code) = e.code {
            self.errors.get_or_create(&Code { code: code.to_string() }).inc();
        }
        if e.new_point {
            self.points.get_or_create(&Target { target: e.target.to_string() }).inc();
        }
    }

    /// The text exposition, with the gauges as they stand now.
    pub fn encode(&self, running: usize, rpo: &[(String, f64)]) -> String {
        self.sessions.set(running as i64);
        for (disk, seconds) in rpo {
            // The encoder does not escape label values (client_rust#151).
            let disk: String = disk.chars().map(|c| if matches!(c, '"' | '\\' | '\n') { '_' } else { c }).collect();
            self.rpo.get_or_create(&Disk { disk }).set(*seconds);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
