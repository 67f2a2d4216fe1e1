//! The load manager: one broker at a time (elected through an ephemeral key
//! on its lease) looks at every broker's bundles and load report and moves
//! bundles so that brokers stay balanced, and splits hot bundles.
//!
//! The decision is a pure function of (brokers, owners, loads, recent
//! moves, now) — `decide` — tested without a cluster; `run` is the thin
//! task around it that reads the metadata service and hands each action to
//! the bundle's owner as a command.
//!
//! Balancing: by bundle count (a broker that joins gets its share even when
//! the cluster is idle) and, when there is traffic, by message rate. A
//! bundle moved recently stays put for a cool-down, so nothing flaps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magnetar_metadata::{Compare, MetadataClient, Op, Txn};
use serde::Deserialize;

use super::commands::{self, Command};
use crate::keys;
use crate::ownership::registration::{BundleLoad, RegisteredBroker};
use crate::topic::TopicRegistry;

/// The `[load_manager]` section of a broker's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadManagerConfig {
    pub enabled: bool,
    /// How often the leader looks.
    pub interval_ms: u64,
    /// Bundle moves per look, at most.
    pub max_moves_per_round: usize,
    /// A bundle moved is not moved again for this long.
    pub move_cooldown_ms: u64,
    /// Rate balancing starts when the cluster takes this many msg/s.
    pub min_rate_to_balance: f64,
    /// A broker is overloaded above the mean rate times (1 + this).
    pub overload_threshold: f64,
    /// Split a bundle holding more topics than this,
    pub split_max_topics: u64,
    /// or taking more messages per second (in + out) than this,
    pub split_max_msg_rate: f64,
    /// or more bytes per second (in + out) than this.
    pub split_max_bytes_rate: f64,
    /// No splits beyond this many bundles in a namespace.
    pub max_bundles_per_namespace: usize,
}

impl Default for LoadManagerConfig {
    fn default() -> Self {
        LoadManagerConfig {
            enabled: true,
            interval_ms: 5000,
            max_moves_per_round: 4,
            move_cooldown_ms: 60_000,
            min_rate_to_balance: 1000.0,
            overload_threshold: 0.3,
            split_max_topics: 1000,
            split_max_msg_rate: 30_000.0,
            split_max_bytes_rate: 100e6,
            max_bundles_per_namespace: 128,
        }
    }
}

/// A broker as the decision sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerView {
    pub id: String,
    pub draining: bool,
    /// Bundles it owns (`tenant/ns/0x.._0x..`) with their load.
    pub bundles: BTreeMap<String, BundleLoad>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Move {
        bundle: String,
        from: String,
        to: String,
    },
    Split {
        bundle: String,
        owner: String,
    },
}

fn rate(b: &BundleLoad) -> f64 {
    b.msg_rate_in + b.msg_rate_out
}

fn broker_rate(b: &BrokerView) -> f64 {
    b.bundles.values().map(rate).sum()
}

fn namespace_of(bundle: &str) -> &str {
    bundle.rsplit_once('/').map(|(ns, _)| ns).unwrap_or(bundle)
}

/// What to do now. `moved` holds when each bundle last moved.
pub fn decide(
    brokers: &[BrokerView],
    moved: &HashMap<String, Instant>,
    now: Instant,
    cfg: &LoadManagerConfig,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let cooldown = Duration::from_millis(cfg.move_cooldown_ms);
    let may_move = |bundle: &str| {
        moved
            .get(bundle)
            .is_none_or(|t| now.saturating_duration_since(*t) >= cooldown)
    };

    // Hot bundles split first.
    let mut per_ns: HashMap<&str, usize> = HashMap::new();
    for b in brokers {
        for name in b.bundles.keys() {
            *per_ns.entry(namespace_of(name)).or_default() += 1;
        }
    }
    for b in brokers {
        for (name, load) in &b.bundles {
            let hot = load.topics > cfg.split_max_topics
                || rate(load) > cfg.split_max_msg_rate
                || load.bytes_rate_in + load.bytes_rate_out > cfg.split_max_bytes_rate;
            let ns = namespace_of(name);
            if hot && per_ns.get(ns).copied().unwrap_or(0) < cfg.max_bundles_per_namespace {
                *per_ns.entry(ns).or_default() += 1;
                actions.push(Action::Split {
                    bundle: name.clone(),
                    owner: b.id.clone(),
                });
            }
        }
    }

    // Then moves, on a working copy of who owns what.
    let mut view: Vec<BrokerView> = brokers.iter().filter(|b| !b.draining).cloned().collect();
    if view.len() < 2 {
        return actions;
    }
    let total_rate: f64 = view.iter().map(broker_rate).sum();
    for _ in 0..cfg.max_moves_per_round {
        let Some(step) = next_move(&view, total_rate, cfg, &may_move) else {
            break;
        };
        let (from, to, bundle) = step;
        if let Some(load) = view[from].bundles.remove(&bundle) {
            view[to].bundles.insert(bundle.clone(), load);
        }
        actions.push(Action::Move {
            bundle,
            from: view[from].id.clone(),
            to: view[to].id.clone(),
        });
    }
    actions
}

/// One move: (from index, to index, bundle).
fn next_move(
    view: &[BrokerView],
    total_rate: f64,
    cfg: &LoadManagerConfig,
    may_move: &dyn Fn(&str) -> bool,
) -> Option<(usize, usize, String)> {
    let by_count = |i: &usize| (view[*i].bundles.len(), view[*i].id.clone());
    let idx: Vec<usize> = (0..view.len()).collect();
    // By rate, when there is traffic and a broker is well above the mean.
    if total_rate >= cfg.min_rate_to_balance {
        let mean = total_rate / view.len() as f64;
        let by_rate = |i: &usize| broker_rate(&view[*i]);
        let hot = *idx
            .iter()
            .max_by(|a, b| by_rate(a).total_cmp(&by_rate(b)))?;
        let cold = *idx
            .iter()
            .min_by(|a, b| by_rate(a).total_cmp(&by_rate(b)))?;
        let gap = by_rate(&hot) - by_rate(&cold);
        if hot != cold && by_rate(&hot) > mean * (1.0 + cfg.overload_threshold) {
            // The movable bundle that best halves the gap (never one that
            // would just swap the roles).
            let pick = view[hot]
                .bundles
                .iter()
                .filter(|(n, l)| may_move(n) && rate(l) > 0.0 && rate(l) < gap)
                .min_by(|(_, a), (_, b)| {
                    (rate(a) - gap / 2.0)
                        .abs()
                        .total_cmp(&(rate(b) - gap / 2.0).abs())
                })
                .map(|(n, _)| n.clone());
            if let Some(bundle) = pick {
                return Some((hot, cold, bundle));
            }
        }
    }
    // By count.
    let most = *idx.iter().max_by_key(|i| by_count(i))?;
    let least = *idx.iter().min_by_key(|i| by_count(i))?;
    if view[most].bundles.len() <= view[least].bundles.len() + 1 {
        return None;
    }
    // The least busy movable bundle: the fewest clients disturbed.
    let bundle = view[most]
        .bundles
        .iter()
        .filter(|(n, _)| may_move(n))
        .min_by(|(na, a), (nb, b)| rate(a).total_cmp(&rate(b)).then(na.cmp(nb)))
        .map(|(n, _)| n.clone())?;
    Some((most, least, bundle))
}

/// Brokers with the bundles they own now (owner keys) and the loads they
/// last reported.
async fn view(registry: &TopicRegistry) -> Result<Vec<BrokerView>, crate::BrokerError> {
    let own = &registry.ownership;
    let (brokers, _) = own.cluster().await?;
    let owners = own.owners().await?;
    let mut out: Vec<BrokerView> = brokers
        .iter()
        .map(|b: &RegisteredBroker| BrokerView {
            id: b.info.broker_id.clone(),
            draining: b.info.draining,
            bundles: BTreeMap::new(),
        })
        .collect();
    for (bundle, o) in owners {
        let Some(i) = out.iter().position(|b| b.id == o.broker_id) else {
            continue;
        };
        let load = brokers[i]
            .info
            .load
            .bundle_loads
            .get(&bundle)
            .cloned()
            .unwrap_or_default();
        out[i].bundles.insert(bundle, load);
    }
    Ok(out)
}

/// Holds the leadership key on our lease, or tells whether we hold it.
async fn lead(md: &MetadataClient, registry: &TopicRegistry) -> bool {
    let me = registry.ownership.me().broker_id;
    let lease = registry.ownership.registration.lease_id();
    match md.get(keys::LOAD_MANAGER_LEADER).await {
        Ok(Some(kv)) => kv.value == me.as_bytes() && kv.lease == Some(lease),
        Ok(None) => md
            .txn(Txn {
                compares: vec![Compare {
                    key: keys::LOAD_MANAGER_LEADER.into(),
                    version: 0,
                }],
                success: vec![Op::Put {
                    key: keys::LOAD_MANAGER_LEADER.into(),
                    value: me.into_bytes(),
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await
            .is_ok_and(|r| r.succeeded),
        Err(_) => false,
    }
}

/// The load manager's task on every broker; only the leader acts.
pub async fn run(registry: Arc<TopicRegistry>, md: MetadataClient, cfg: LoadManagerConfig) {
    if !cfg.enabled {
        return;
    }
    let mut moved: HashMap<String, Instant> = HashMap::new();
    let every = Duration::from_millis(cfg.interval_ms.max(100));
    loop {
        tokio::time::sleep(every).await;
        if !registry.ownership.registration.is_valid() || !lead(&md, &registry).await {
            continue;
        }
        let brokers = match view(&registry).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "load manager cannot see the cluster");
                continue;
            }
        };
        let now = Instant::now();
        moved.retain(|_, t| now.duration_since(*t) < Duration::from_millis(cfg.move_cooldown_ms));
        for action in decide(&brokers, &moved, now, &cfg) {
            tracing::info!(?action, "load manager");
            let (owner, cmd) = match &action {
                Action::Move { bundle, from, to } => {
                    moved.insert(bundle.clone(), now);
                    (
                        from.clone(),
                        Command::Unload {
                            bundle: bundle.clone(),
                            destination: Some(to.clone()),
                        },
                    )
                }
                Action::Split { bundle, owner } => (
                    owner.clone(),
                    Command::Split {
                        bundle: bundle.clone(),
                    },
                ),
            };
            let me = registry.ownership.me().broker_id;
            let res = if owner == me {
                commands::execute(&registry, &cmd).await
            } else {
                let lease = registry.ownership.registration.lease_id();
                commands::submit(&md, lease, &me, &owner, &cmd).await
            };
            if let Err(e) = res {
                tracing::warn!(?action, error = %e, "load manager action failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(id: &str, bundles: &[(&str, f64)]) -> BrokerView {
        BrokerView {
            id: id.into(),
            draining: false,
            bundles: bundles
                .iter()
                .map(|(n, r)| {
                    (
                        format!("ns/{n}"),
                        BundleLoad {
                            topics: 1,
                            msg_rate_in: *r,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    fn cfg() -> LoadManagerConfig {
        LoadManagerConfig::default()
    }

    fn counts(brokers: &[BrokerView], actions: &[Action]) -> Vec<usize> {
        let mut n: Vec<usize> = brokers.iter().map(|b| b.bundles.len()).collect();
        for a in actions {
            if let Action::Move { from, to, .. } = a {
                let f = brokers.iter().position(|b| &b.id == from).unwrap_or(0);
                let t = brokers.iter().position(|b| &b.id == to).unwrap_or(0);
                n[f] -= 1;
                n[t] += 1;
            }
        }
        n
    }

    #[test]
    fn a_joining_broker_gets_its_share_of_an_idle_cluster() {
        let names: Vec<String> = (0..16).map(|i| format!("b{i:02}")).collect();
        let half = |r: std::ops::Range<usize>| -> Vec<(&str, f64)> {
            names[r].iter().map(|n| (n.as_str(), 0.0)).collect()
        };
        let mut brokers = vec![
            broker("a", &half(0..8)),
            broker("b", &half(8..16)),
            broker("c", &[]),
        ];
        let now = Instant::now();
        let mut moved = HashMap::new();
        // Round after round (as the task runs it), until nothing moves.
        for _ in 0..5 {
            let actions = decide(&brokers, &moved, now, &cfg());
            assert!(actions.len() <= cfg().max_moves_per_round);
            for a in &actions {
                let Action::Move { bundle, from, to } = a else {
                    panic!("{a:?}")
                };
                let l = brokers
                    .iter_mut()
                    .find(|b| &b.id == from)
                    .and_then(|b| b.bundles.remove(bundle));
                brokers
                    .iter_mut()
                    .find(|b| &b.id == to)
                    .map(|b| b.bundles.insert(bundle.clone(), l.unwrap_or_default()));
                moved.insert(bundle.clone(), now);
            }
        }
        let n: Vec<usize> = brokers.iter().map(|b| b.bundles.len()).collect();
        assert!(
            n.iter().max().unwrap_or(&0) - n.iter().min().unwrap_or(&0) <= 1,
            "{n:?}"
        );
        assert!(
            decide(&brokers, &moved, now, &cfg()).is_empty(),
            "balanced: nothing more"
        );
    }

    #[test]
    fn balanced_clusters_and_single_brokers_are_left_alone() {
        let now = Instant::now();
        let b = vec![
            broker("a", &[("1", 0.0), ("2", 0.0)]),
            broker("b", &[("3", 0.0)]),
        ];
        assert!(decide(&b, &HashMap::new(), now, &cfg()).is_empty());
        let one = vec![broker("a", &[("1", 0.0), ("2", 0.0), ("3", 0.0)])];
        assert!(decide(&one, &HashMap::new(), now, &cfg()).is_empty());
    }

    #[test]
    fn draining_brokers_get_nothing_and_recent_moves_stay() {
        let now = Instant::now();
        let mut c = broker("c", &[]);
        c.draining = true;
        let b = vec![
            broker("a", &[("1", 0.0), ("2", 0.0), ("3", 0.0)]),
            broker("b", &[]),
            c,
        ];
        let acts = decide(&b, &HashMap::new(), now, &cfg());
        assert_eq!(counts(&b, &acts), vec![2, 1, 0]);
        let moved: HashMap<String, Instant> = ["ns/1", "ns/2", "ns/3"]
            .iter()
            .map(|n| (n.to_string(), now))
            .collect();
        assert!(
            decide(&b, &moved, now, &cfg()).is_empty(),
            "all cooling down"
        );
        let later = now + Duration::from_millis(cfg().move_cooldown_ms);
        assert!(!decide(&b, &moved, later, &cfg()).is_empty());
    }

    #[test]
    fn with_traffic_the_hot_broker_sheds_a_bundle_by_rate() {
        let now = Instant::now();
        // Same bundle counts, but "a" takes 9,000 msg/s and "b" 1,000.
        let b = vec![
            broker("a", &[("1", 5000.0), ("2", 4000.0)]),
            broker("b", &[("3", 500.0), ("4", 500.0)]),
        ];
        let acts = decide(&b, &HashMap::new(), now, &cfg());
        assert_eq!(
            acts.first(),
            Some(&Action::Move {
                bundle: "ns/2".into(),
                from: "a".into(),
                to: "b".into()
            }),
            "the bundle closest to half the gap: {acts:?}"
        );
    }

    #[test]
    fn hot_bundles_split_up_to_the_namespace_limit() {
        let now = Instant::now();
        let mut b = vec![broker("a", &[("1", 50_000.0), ("2", 10.0)])];
        let acts = decide(&b, &HashMap::new(), now, &cfg());
        assert_eq!(
            acts,
            vec![Action::Split {
                bundle: "ns/1".into(),
                owner: "a".into()
            }]
        );
        if let Some(l) = b[0].bundles.get_mut("ns/2") {
            l.topics = 5000;
        }
        let limited = LoadManagerConfig {
            max_bundles_per_namespace: 3,
            ..cfg()
        };
        let acts = decide(&b, &HashMap::new(), now, &limited);
        assert_eq!(acts.len(), 1, "one split reaches the limit of 3: {acts:?}");
    }
}
