//! Prometheus metrics, served at `/metrics`.
//!
//! A leaf module: it defines every counter the server keeps (the per-path stats structs the
//! hub, outboxes, inboxes and the wake socket update) and their labels, and imports nothing
//! else of the crate, so any module can count without importing the modules it counts for.

use std::sync::Arc;

use livepush_proto::Class;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Counters shared by all outboxes (exported as metrics).
#[derive(Debug, Default, Clone)]
pub struct OutboxStats {
    pub dropped_transient: Counter,
    pub prompted: Counter,
    pub slow_consumer_closes: Counter,
}

/// Counters of merged pushes (exported as metrics).
#[derive(Debug, Default, Clone)]
pub struct MergeStats {
    /// Chunks pushed, each to every member.
    pub flushes: Counter,
    /// Frames those chunks carried.
    pub frames: Counter,
}

/// Counters of the inbox path.
#[derive(Debug, Default, Clone)]
pub struct InboxStats {
    pub posted: Counter,
    /// Messages dropped unacknowledged, by reason: overflow, expired.
    pub dropped: Family<ReasonLabel, Counter>,
}

/// Counters of the wake path (exported as metrics).
#[derive(Debug, Default, Clone)]
pub struct WakeStats {
    /// Keepalives, by result: accepted, bad_mac, stale, replayed, malformed.
    pub keepalives: Family<ReasonLabel, Counter>,
    /// Wake datagrams, by result: sent, rate_limited, too_large, send_failed.
    pub wakes: Family<ReasonLabel, Counter>,
}

impl WakeStats {
    pub fn keepalive(&self, reason: &'static str) {
        self.keepalives.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn wake(&self, reason: &'static str) {
        self.wakes.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// Calls of the engine's shared backend (Redis with `--redis`; none on one node).
#[derive(Debug, Default, Clone)]
pub struct EngineStats {
    /// Calls answered or failed (scripts, pipelines, reads).
    pub calls: Counter,
    /// Calls that failed (timeouts, connection losses, errors from Redis).
    pub errors: Counter,
    /// The subscription connection was lost (then every open room reads what it missed).
    pub link_lost: Counter,
}

/// The backend hooks' calls.
#[derive(Debug, Clone)]
pub struct HookStats {
    /// How long the send hook took to answer (or to fail).
    pub seconds: Histogram,
    /// Send hook failures, by reason: timeout, error, busy, bad_answer.
    pub failures: Family<ReasonLabel, Counter>,
}

impl Default for HookStats {
    fn default() -> Self {
        HookStats {
            seconds: latency(),
            failures: Family::default(),
        }
    }
}

impl HookStats {
    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// Latency buckets in seconds: 0.5 ms to about 8 s, doubling.
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections_open: Family<TransportLabel, Gauge>,
    pub connections_total: Family<TransportLabel, Counter>,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub published: Family<ClassLabel, Counter>,
    pub transient_deliveries: Counter,
    pub rooms: Gauge,
    pub client_errors: Counter,
    pub outbox: Arc<OutboxStats>,
    pub merge: MergeStats,
    pub inbox: InboxStats,
    pub wake: WakeStats,
    /// From a publish call to its answer, by class: for a reliable message this is the
    /// store's (or Redis's) share; for a transient one, the fan-out on this node.
    pub publish_seconds: Family<ClassLabel, Histogram, fn() -> Histogram>,
    /// From a reliable message's publish (its `ts`, wall clock, ms) to its fan-out into this
    /// node's members' queues: the engine's share, across nodes with `--redis`.
    pub fanout_delay_seconds: Histogram,
    pub hooks: HookStats,
    /// The connect hook's calls (failures: timeout, error, busy, bad_answer).
    pub connect_hooks: HookStats,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None, None)
    }
}

impl Metrics {
    /// `engine`: the shared backend's counters, when there is one; `store_commits`: how long
    /// the embedded store's commits take, when it has a file.
    pub fn new(engine: Option<EngineStats>, store_commits: Option<Histogram>) -> Metrics {
        let mut registry = Registry::with_prefix("livepush");
        let m = Metrics {
            registry: Registry::default(),
            connections_open: Family::default(),
            connections_total: Family::default(),
            disconnects: Family::default(),
            published: Family::default(),
            transient_deliveries: Counter::default(),
            rooms: Gauge::default(),
            client_errors: Counter::default(),
            outbox: Arc::default(),
            merge: MergeStats::default(),
            inbox: InboxStats::default(),
            wake: WakeStats::default(),
            publish_seconds: Family::new_with_constructor(latency),
            fanout_delay_seconds: latency(),
            hooks: HookStats::default(),
            connect_hooks: HookStats::default(),
        };
        // One line per metric: name, help, the metric (registered by a clone sharing it).
        macro_rules! register {
            ($($name:literal, $help:literal, $metric:expr;)*) => {
                $(registry.register($name, $help, $metric.clone());)*
            };
        }
        register!(
            "connections_open", "Open terminal connections", m.connections_open;
            "connections", "Terminal connections accepted", m.connections_total;
            "disconnects", "Terminal connections ended, by reason", m.disconnects;
            "published", "Messages published", m.published;
            "transient_deliveries", "Transient messages delivered to connections (members of their rooms)", m.transient_deliveries;
            "rooms", "Rooms this node holds open (members joined or pulled here)", m.rooms;
            "client_errors", "Error frames sent to terminals", m.client_errors;
            "dropped_transient", "Transient messages dropped for slow terminals", m.outbox.dropped_transient;
            "prompts", "Reliable messages replaced by a prompt for slow terminals", m.outbox.prompted;
            "slow_consumer_closes", "Connections closed as slow consumers: outgoing queue past its hard limit, or a write blocked for write_timeout", m.outbox.slow_consumer_closes;
            "merge_flushes", "Merged chunks rooms appended to their rings (--merge-ms), one entry each", m.merge.flushes;
            "merged_frames", "Messages carried in merged chunks (--merge-ms)", m.merge.frames;
            "inbox_posted", "Direct messages posted to terminal inboxes", m.inbox.posted;
            "inbox_dropped", "Inbox messages dropped unacknowledged, by reason", m.inbox.dropped;
            "wake_keepalives", "UDP keepalives received, by result", m.wake.keepalives;
            "wake_datagrams", "Wake datagrams, by result", m.wake.wakes;
            "publish_seconds", "From a publish call to its answer, by class (reliable: the store's or Redis's share)", m.publish_seconds;
            "fanout_delay_seconds", "From a reliable message's publish to its fan-out into this node's member queues", m.fanout_delay_seconds;
            "send_hook_seconds", "How long the send hook took to answer or fail", m.hooks.seconds;
            "send_hook_failures", "Send hook failures, by reason (timeout, error, busy, bad_answer)", m.hooks.failures;
            "connect_hook_seconds", "How long the connect hook took to answer or fail", m.connect_hooks.seconds;
            "connect_hook_failures", "Connect hook failures, by reason (timeout, error, busy, bad_answer)", m.connect_hooks.failures;
        );
        if let Some(h) = store_commits {
            registry.register(
                "store_commit_seconds",
                "How long the embedded store takes to write a batch (its transaction, with the fsync when durable)",
                h,
            );
        }
        if let Some(e) = engine {
            register!(
                "engine_calls", "Calls of the shared backend (Redis)", e.calls;
                "engine_errors", "Failed calls of the shared backend (Redis): timeouts, lost connections, errors", e.errors;
                "engine_link_lost", "Losses of the subscription connection to the shared backend (Redis)", e.link_lost;
            );
        }
        Metrics { registry, ..m }
    }

    pub fn record_publish(&self, class: Class, transient_delivered: usize) {
        self.published
            .get_or_create(&ClassLabel {
                class: class.as_str(),
            })
            .inc();
        if transient_delivered > 0 {
            self.transient_deliveries.inc_by(transient_delivered as u64);
        }
    }

    pub fn observe_publish(&self, class: Class, took: std::time::Duration) {
        self.publish_seconds
            .get_or_create(&ClassLabel {
                class: class.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
