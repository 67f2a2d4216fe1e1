"""Scrapes every node of a local cluster: each /metrics parses with the
Prometheus project's own parser (prometheus_client), carries its role's
families, histograms have buckets, /live and /ready answer 200; a topic
with traffic shows the right counts under Pulsar's names on the broker
that owns it.

usage: python_metrics.py PULSAR_URL BROKER_HTTP,... BOOKIE_HTTP,... METADATA_HTTP,...
"""

import glob
import json
import os
import re
import sys
import time
import urllib.request

import pulsar
from prometheus_client.parser import text_string_to_metric_families

URL = sys.argv[1]
BROKERS, BOOKIES, METADATA = (a.split(",") for a in sys.argv[2:5])


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def families(base):
    status, body = get(base + "/metrics")
    assert status == 200, (base, status)
    # Raises on anything the exposition format does not allow.
    return {f.name: f for f in text_string_to_metric_families(body)}


# Traffic on one topic: 10 messages in, 10 out to one subscription.
client = pulsar.Client(URL)
consumer = client.subscribe("metrics-probe", "watch")
producer = client.create_producer("metrics-probe", batching_enabled=False)
for i in range(10):
    producer.send(f"m{i}".encode())
for _ in range(10):
    consumer.acknowledge(consumer.receive(timeout_millis=10000))

topic = "persistent://public/default/metrics-probe"


def check_brokers():
    seen_in, seen_out, backlog_subs = 0, 0, 0
    for base in BROKERS:
        for path in ("/live", "/ready", "/admin/v2/brokers/ready"):
            assert get(base + path)[0] == 200, (base, path)
        f = families(base)
        for name in ("magnetar_broker_lease_held", "magnetar_broker_connections",
                     "magnetar_broker_bundles_owned"):
            assert name in f, (base, name, sorted(f))
        if "pulsar_in_messages" not in f:
            continue  # no topic loaded here: no topic families
        for name in ("pulsar_rate_in", "pulsar_msg_backlog", "pulsar_storage_size",
                     "pulsar_subscriptions_count", "magnetar_broker_publish_latency_seconds"):
            assert name in f, (base, name, sorted(f))
        # prometheus_client names a counter family without its _total suffix.
        for s in f["pulsar_in_messages"].samples:
            if s.labels.get("topic") == topic:
                assert s.labels["cluster"] and s.labels["namespace"] == "public/default", s
                seen_in += s.value
        for s in f["pulsar_out_messages"].samples:
            if s.labels.get("topic") == topic:
                seen_out += s.value
        for s in f["pulsar_subscription_back_log"].samples if "pulsar_subscription_back_log" in f else []:
            if s.labels.get("topic") == topic and s.labels.get("subscription") == "watch":
                backlog_subs += 1
                assert s.value == 0, s
        hist = f["magnetar_broker_publish_latency_seconds"]
        assert hist.type == "histogram", hist.type
        buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
        assert len(buckets) > 5, buckets
    assert seen_in == 10 and seen_out == 10 and backlog_subs == 1, (seen_in, seen_out, backlog_subs)


# Acks are grouped by the client: give them a moment to land.
for attempt in range(50):
    try:
        check_brokers()
        break
    except AssertionError:
        if attempt == 49:
            raise
        time.sleep(0.2)

for base in BOOKIES:
    assert get(base + "/live")[0] == 200 and get(base + "/ready")[0] == 200, base
    f = families(base)
    for name in ("magnetar_bookie_journal_sync_seconds", "magnetar_bookie_journal_group_entries",
                 "magnetar_bookie_disk_usage_ratio"):
        assert name in f, (base, name, sorted(f))
    assert f["magnetar_bookie_journal_sync_seconds"].type == "histogram"

leaders = 0
for base in METADATA:
    assert get(base + "/live")[0] == 200 and get(base + "/ready")[0] == 200, base
    f = families(base)
    for name in ("magnetar_metadata_raft_term", "magnetar_metadata_raft_applied_index",
                 "magnetar_metadata_leases", "magnetar_metadata_raft_is_leader"):
        assert name in f, (base, name, sorted(f))
    leaders += sum(s.value for s in f["magnetar_metadata_raft_is_leader"].samples)
assert leaders == 1, leaders
# An error for the error counter (a tenant that does not exist).
try:
    client.create_producer("persistent://no-such-tenant/ns/t")
except Exception:
    pass
else:
    raise AssertionError("a producer on a missing tenant was created")

# Every family the dashboards chart is one some node exports.
exported = set()
for base in BROKERS + BOOKIES + METADATA:
    for name, f in families(base).items():
        exported.add(name)
        if f.type == "counter":
            exported.add(name + "_total")
        if f.type == "histogram":
            exported.update(name + s for s in ("_bucket", "_sum", "_count"))
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "deploy", "grafana")
charted = set()
for path in glob.glob(os.path.join(root, "*.json")):
    with open(path) as fh:
        for panel in json.load(fh)["panels"]:
            for t in panel["targets"]:
                charted.update(re.findall(r"\b((?:pulsar|magnetar)_[a-z0-9_]+)", t["expr"]))
assert len(charted) > 30, charted
missing = charted - exported
assert not missing, f"dashboards chart families no node exports: {sorted(missing)}"

client.close()
print(f"metrics of {len(BROKERS)} brokers, {len(BOOKIES)} bookies and {len(METADATA)} metadata nodes parse; topic counts right: ok")
