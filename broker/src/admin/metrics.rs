//! `GET /metrics`: the process's own families (the `metrics` recorder:
//! latencies, connections, errors, bookie and metadata families when they
//! run in this process) followed by Pulsar's topic families, rendered from
//! the loaded topics' counters at scrape time under Pulsar's names and
//! labels so Pulsar's dashboards and alerts work. With
//! `expose_topic_level_metrics_in_prometheus = false` the topic families are
//! summed per namespace, as Pulsar does, and subscription families are left
//! out.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::http::AdminContext;

/// A subscription's last sample: when, its counters, the rates then.
type SubSample = (Instant, [u64; 3], [f64; 3]);

/// The last counters seen of each subscription (topic, name), for its rates.
#[derive(Default)]
pub struct SubRates(Mutex<HashMap<(String, String), SubSample>>);

/// Shortest interval a rate is computed over; scraped more often, the
/// last rates are reported again.
const RATE_INTERVAL_SECS: f64 = 1.0;

impl SubRates {
    /// Per-second rates of `counters` since the previous scrape; forgets
    /// subscriptions not in `seen`.
    fn rates(&self, key: (String, String), counters: [u64; 3]) -> [f64; 3] {
        let now = Instant::now();
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match g.get(&key) {
            None => {
                g.insert(key, (now, counters, [0.0; 3]));
                [0.0; 3]
            }
            Some((at, last, rates)) => {
                let secs = now.duration_since(*at).as_secs_f64();
                if secs < RATE_INTERVAL_SECS {
                    return *rates;
                }
                let r: [f64; 3] =
                    std::array::from_fn(|i| counters[i].saturating_sub(last[i]) as f64 / secs);
                g.insert(key, (now, counters, r));
                r
            }
        }
    }

    fn retain(&self, seen: &std::collections::HashSet<(String, String)>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| seen.contains(k));
    }
}

/// One family: its type, help and samples (labels, value).
struct Family {
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

/// Families by name, in a fixed order.
#[derive(Default)]
struct Exposition(BTreeMap<&'static str, Family>);

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &str,
        v: f64,
    ) {
        self.0
            .entry(name)
            .or_insert_with(|| Family {
                kind,
                help,
                samples: Vec::new(),
            })
            .samples
            .push((labels.to_string(), v));
    }

    fn write(&self, out: &mut String) {
        for (name, f) in &self.0 {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (labels, v) in &f.samples {
                let _ = writeln!(out, "{name}{{{labels}}} {}", number(*v));
            }
        }
    }
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "0".into()
    }
}

/// A label value, escaped as the exposition format asks.
fn esc(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// What one topic (or namespace, summed) reports.
#[derive(Default, Clone, Copy)]
struct TopicFigures {
    rate_in: f64,
    rate_out: f64,
    throughput_in: f64,
    throughput_out: f64,
    msgs_in: u64,
    bytes_in: u64,
    msgs_out: u64,
    bytes_out: u64,
    storage: u64,
    backlog: u64,
    producers: u64,
    consumers: u64,
    subscriptions: u64,
    topics: u64,
}

impl TopicFigures {
    fn add(&mut self, o: &TopicFigures) {
        self.rate_in += o.rate_in;
        self.rate_out += o.rate_out;
        self.throughput_in += o.throughput_in;
        self.throughput_out += o.throughput_out;
        self.msgs_in += o.msgs_in;
        self.bytes_in += o.bytes_in;
        self.msgs_out += o.msgs_out;
        self.bytes_out += o.bytes_out;
        self.storage += o.storage;
        self.backlog += o.backlog;
        self.producers += o.producers;
        self.consumers += o.consumers;
        self.subscriptions += o.subscriptions;
        self.topics += o.topics;
    }

    fn write(&self, x: &mut Exposition, labels: &str) {
        const G: &str = "gauge";
        const C: &str = "counter";
        x.add(
            "pulsar_rate_in",
            G,
            "messages/s published",
            labels,
            self.rate_in,
        );
        x.add(
            "pulsar_rate_out",
            G,
            "messages/s dispatched",
            labels,
            self.rate_out,
        );
        x.add(
            "pulsar_throughput_in",
            G,
            "bytes/s published",
            labels,
            self.throughput_in,
        );
        x.add(
            "pulsar_throughput_out",
            G,
            "bytes/s dispatched",
            labels,
            self.throughput_out,
        );
        x.add(
            "pulsar_in_messages_total",
            C,
            "messages published",
            labels,
            self.msgs_in as f64,
        );
        x.add(
            "pulsar_in_bytes_total",
            C,
            "bytes published",
            labels,
            self.bytes_in as f64,
        );
        x.add(
            "pulsar_out_messages_total",
            C,
            "messages dispatched",
            labels,
            self.msgs_out as f64,
        );
        x.add(
            "pulsar_out_bytes_total",
            C,
            "bytes dispatched",
            labels,
            self.bytes_out as f64,
        );
        x.add(
            "pulsar_storage_size",
            G,
            "bytes stored (one copy)",
            labels,
            self.storage as f64,
        );
        x.add(
            "pulsar_msg_backlog",
            G,
            "entries not acknowledged, summed over subscriptions",
            labels,
            self.backlog as f64,
        );
        x.add(
            "pulsar_producers_count",
            G,
            "producers connected",
            labels,
            self.producers as f64,
        );
        x.add(
            "pulsar_consumers_count",
            G,
            "consumers connected",
            labels,
            self.consumers as f64,
        );
        x.add(
            "pulsar_subscriptions_count",
            G,
            "subscriptions",
            labels,
            self.subscriptions as f64,
        );
        let avg = if self.msgs_in == 0 {
            0.0
        } else {
            self.bytes_in as f64 / self.msgs_in as f64
        };
        x.add(
            "pulsar_average_msg_size",
            G,
            "bytes per published message",
            labels,
            avg,
        );
    }
}

/// The whole exposition.
pub async fn render(ctx: &AdminContext) -> String {
    let topics = ctx.topics.loaded();
    // Gauges of this broker's state, read now.
    metrics::gauge!(crate::metrics::TOPICS_LOADED).set(topics.len() as f64);
    metrics::gauge!(crate::metrics::BUNDLES_OWNED).set(ctx.topics.ownership.owned().len() as f64);
    let held = ctx.topics.ownership.registration.is_valid();
    metrics::gauge!(crate::metrics::LEASE_HELD).set(if held { 1.0 } else { 0.0 });
    let mut out = crate::metrics::handle()
        .map(|h| h.render())
        .unwrap_or_default();
    let cluster = esc(&ctx.cluster);
    let mut x = Exposition::default();
    let mut namespaces: BTreeMap<String, TopicFigures> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for t in topics {
        let [msgs_in, bytes_in, msgs_out, bytes_out] = t.stats.counters();
        let r = t.stats.rates();
        let subs = t.subscription_stats().await;
        let mut f = TopicFigures {
            rate_in: r.msgs_in,
            rate_out: r.msgs_out,
            throughput_in: r.bytes_in,
            throughput_out: r.bytes_out,
            msgs_in,
            bytes_in,
            msgs_out,
            bytes_out,
            storage: t.ml.size_bytes(),
            producers: t.producer_count() as u64,
            subscriptions: subs.len() as u64,
            topics: 1,
            ..Default::default()
        };
        let name = t.name.to_string();
        let ns = t.name.namespace();
        let topic_labels = format!(
            "cluster=\"{cluster}\",namespace=\"{}\",topic=\"{}\"",
            esc(&ns),
            esc(&name)
        );
        for (sub, s) in &subs {
            f.backlog += s.msg_backlog;
            f.consumers += s.consumers.len() as u64;
            if !ctx.expose_topic_level_metrics {
                continue;
            }
            let key = (name.clone(), sub.clone());
            let [rate_out, throughput_out, rate_redeliver] = ctx
                .sub_rates
                .rates(key.clone(), [s.msgs_out, s.bytes_out, s.redelivered]);
            seen.insert(key);
            let l = format!("{topic_labels},subscription=\"{}\"", esc(sub));
            const G: &str = "gauge";
            x.add(
                "pulsar_subscription_back_log",
                G,
                "entries not acknowledged",
                &l,
                s.msg_backlog as f64,
            );
            x.add(
                "pulsar_subscription_unacked_messages",
                G,
                "entries delivered and not acknowledged",
                &l,
                s.unacked as f64,
            );
            x.add(
                "pulsar_subscription_delayed",
                G,
                "messages waiting for their delivery time",
                &l,
                s.delayed as f64,
            );
            x.add(
                "pulsar_subscription_msg_rate_out",
                G,
                "messages/s dispatched",
                &l,
                rate_out,
            );
            x.add(
                "pulsar_subscription_msg_throughput_out",
                G,
                "bytes/s dispatched",
                &l,
                throughput_out,
            );
            x.add(
                "pulsar_subscription_msg_rate_redeliver",
                G,
                "messages/s dispatched again",
                &l,
                rate_redeliver,
            );
            x.add(
                "pulsar_subscription_consumers_count",
                G,
                "consumers connected",
                &l,
                s.consumers.len() as f64,
            );
        }
        if ctx.expose_topic_level_metrics {
            f.write(&mut x, &topic_labels);
        }
        namespaces.entry(ns).or_default().add(&f);
    }
    ctx.sub_rates.retain(&seen);
    for (ns, f) in &namespaces {
        let labels = format!("cluster=\"{cluster}\",namespace=\"{}\"", esc(ns));
        if !ctx.expose_topic_level_metrics {
            f.write(&mut x, &labels);
        }
        x.add(
            "pulsar_topics_count",
            "gauge",
            "topics loaded",
            &labels,
            f.topics as f64,
        );
    }
    x.write(&mut out);
    out
}

pub async fn handler(State(ctx): State<Arc<AdminContext>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&ctx).await,
    )
}
