//! Where an unowned bundle goes: the pure choice among registered brokers.
//! Fewest owned bundles first (counted from the owner keys, which are
//! current, not from load reports, which lag); among those within one of
//! the fewest, the bundle's own pick by rendezvous hashing, so that bundles
//! looked up at the same moment spread instead of piling onto one broker.

use std::collections::HashMap;

use super::registration::RegisteredBroker;

/// The broker `bundle` should go to, if any can take it. `owned` counts the
/// bundles each broker owns; `exclude` is a broker to leave out (the one
/// unloading it).
pub fn choose<'a>(
    bundle: &str,
    brokers: &'a [RegisteredBroker],
    owned: &HashMap<String, usize>,
    exclude: Option<&str>,
) -> Option<&'a RegisteredBroker> {
    let eligible: Vec<&RegisteredBroker> = brokers
        .iter()
        .filter(|b| !b.info.draining && Some(b.info.broker_id.as_str()) != exclude)
        .collect();
    let count = |b: &RegisteredBroker| owned.get(&b.info.broker_id).copied().unwrap_or(0);
    let fewest = eligible.iter().map(|b| count(b)).min()?;
    eligible
        .into_iter()
        .filter(|b| count(b) <= fewest + 1)
        .max_by_key(|b| {
            let key = format!("{bundle}@{}", b.info.broker_id);
            // Fewer bundles first; the hash breaks ties.
            (std::cmp::Reverse(count(b)), crc32c::crc32c(key.as_bytes()))
        })
}

#[cfg(test)]
mod tests {
    use super::super::registration::BrokerInfo;
    use super::*;

    fn b(id: &str, draining: bool) -> RegisteredBroker {
        RegisteredBroker {
            info: BrokerInfo {
                broker_id: id.into(),
                pulsar_url: format!("pulsar://{id}"),
                pulsar_url_tls: None,
                http_url: None,
                draining,
                load: Default::default(),
            },
            lease: Some(1),
            version: 1,
        }
    }

    #[test]
    fn fewest_bundles_wins_and_draining_or_excluded_brokers_get_nothing() {
        let brokers = vec![b("a", false), b("b", false), b("c", true)];
        let owned = HashMap::from([("a".to_string(), 5), ("b".to_string(), 1)]);
        for i in 0..20 {
            let got = choose(&format!("ns/{i}"), &brokers, &owned, None).unwrap();
            assert_eq!(got.info.broker_id, "b");
        }
        assert_eq!(
            choose("x", &brokers, &owned, Some("b"))
                .unwrap()
                .info
                .broker_id,
            "a"
        );
        assert!(choose("x", &brokers[2..], &owned, None).is_none());
        assert!(choose("x", &[], &owned, None).is_none());
    }

    #[test]
    fn ties_spread_over_brokers() {
        let brokers = vec![b("a", false), b("b", false), b("c", false)];
        let owned = HashMap::new();
        let mut picks = HashMap::new();
        for i in 0..300 {
            let got = choose(&format!("ns/{i}"), &brokers, &owned, None).unwrap();
            *picks.entry(got.info.broker_id.clone()).or_insert(0) += 1;
        }
        assert_eq!(picks.len(), 3, "{picks:?}");
        assert!(picks.values().all(|n| *n > 60), "{picks:?}");
    }
}
