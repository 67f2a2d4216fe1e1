"""Compatibility: tenants, namespaces and partitioned topics made through
Pulsar's admin REST paths (plain HTTP), used by the official Python
pulsar-client. A terminated topic refuses producers and sends. A
partitioned topic: the client finds its partitions, sends
with keys — every key lands on one partition, in order — and a Shared
consumer of the whole topic gets every message once. A namespace whose
policy creates partitioned topics on first use gives a new topic that many
partitions; one that forbids creating topics on first use refuses a
producer of an unknown topic. A namespace with topics cannot be deleted.
Usage: python_topics.py SERVICE_URL HTTP_URL"""
import json
import time
import sys
import urllib.error
import urllib.request
import uuid

import pulsar

url, http = sys.argv[1], sys.argv[2].rstrip("/")
client = pulsar.Client(url, operation_timeout_seconds=20)


def call(method, path, body=None):
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(http + "/admin/v2" + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ok(method, path, body=None, want=204):
    status, got = call(method, path, body)
    assert status == want, f"{method} {path}: {status} {got}"
    return got


tenant = "py-" + uuid.uuid4().hex[:8]
ok("PUT", f"/tenants/{tenant}", {"adminRoles": [], "allowedClusters": []})
ok("PUT", f"/namespaces/{tenant}/app", {"bundles": {"numBundles": 4}})
assert ok("GET", f"/namespaces/{tenant}", want=200) == [f"{tenant}/app"]

# A partitioned topic, made by REST, used by the client.
topic = f"persistent://{tenant}/app/orders"
ok("PUT", f"/persistent/{tenant}/app/orders/partitions", "4")
assert ok("GET", f"/persistent/{tenant}/app/orders/partitions", want=200) == {"partitions": 4}
assert client.get_topic_partitions(topic) == [f"{topic}-partition-{i}" for i in range(4)]
consumer = client.subscribe(topic, "all", consumer_type=pulsar.ConsumerType.Shared,
                            initial_position=pulsar.InitialPosition.Earliest)
producer = client.create_producer(topic, batching_enabled=False)
keys = [f"k{i}" for i in range(12)]
sent = 240
for i in range(sent):
    producer.send(f"{i}".encode(), partition_key=keys[i % len(keys)])
partition_of = {}
last = {}
got = 0
for _ in range(sent):
    m = consumer.receive(timeout_millis=10000)
    k = m.partition_key()
    assert partition_of.setdefault(k, m.topic_name()) == m.topic_name(), f"key {k} on two partitions"
    n = int(m.data())
    assert last.get(k, -1) < n, f"key {k} out of order: {n} after {last.get(k)}"
    last[k] = n
    consumer.acknowledge(m)
    got += 1
assert got == sent
assert len(set(partition_of.values())) > 1, "every key on one partition"
print(f"partitioned topic: {sent} messages over {len(set(partition_of.values()))} partitions, "
      "each key on one partition and in order: ok")
status, why = call("DELETE", f"/namespaces/{tenant}/app")
assert status == 409, f"a namespace with topics was deleted: {status} {why}"
producer.close()
consumer.close()

# First use creates partitioned topics with the namespace's count.
ok("PUT", f"/namespaces/{tenant}/auto")
ok("POST", f"/namespaces/{tenant}/auto/autoTopicCreation",
   {"allowAutoTopicCreation": True, "topicType": "partitioned", "defaultNumPartitions": 3})
p = client.create_producer(f"persistent://{tenant}/auto/fresh")
p.send(b"x")
p.close()
assert ok("GET", f"/persistent/{tenant}/auto/fresh/partitions", want=200) == {"partitions": 3}
print("a namespace creating partitioned topics on first use: 3 partitions: ok")

# A namespace that forbids creating topics on first use.
ok("PUT", f"/namespaces/{tenant}/strict")
ok("POST", f"/namespaces/{tenant}/strict/autoTopicCreation", {"allowAutoTopicCreation": False})
try:
    client.create_producer(f"persistent://{tenant}/strict/unknown")
    raise AssertionError("a producer of an unknown topic was accepted")
except pulsar.TopicNotFound:
    pass
ok("PUT", f"/persistent/{tenant}/strict/known")
p = client.create_producer(f"persistent://{tenant}/strict/known")
p.send(b"y")
p.close()
print("a namespace forbidding first-use creation refuses unknown topics: ok")

# Terminating: the last message's id comes back; later sends fail.
term = f"persistent://{tenant}/strict/known"
p = client.create_producer(term, batching_enabled=False)
last = p.send(b"last")
got = ok("POST", f"/persistent/{tenant}/strict/known/terminate", want=200)
assert (got["ledgerId"], got["entryId"]) == (last.ledger_id(), last.entry_id()), (got, last)
try:
    p.send(b"after")
    raise AssertionError("a send to a terminated topic was accepted")
except pulsar.TopicTerminated:
    pass
try:
    client.create_producer(term)
    raise AssertionError("a producer of a terminated topic was accepted")
except pulsar.TopicTerminated:
    pass
print("a terminated topic refuses producers and sends: ok")

# Producer access modes: one exclusive writer; fencing pushes it out.
one = f"persistent://{tenant}/app/one-writer"
x = client.create_producer(one, access_mode=pulsar.ProducerAccessMode.Exclusive)
x.send(b"x")
for m in (pulsar.ProducerAccessMode.Shared, pulsar.ProducerAccessMode.Exclusive):
    try:
        client.create_producer(one, access_mode=m)
        raise AssertionError(f"a {m} producer joined an exclusive one")
    except pulsar.ProducerBusy:
        pass
f = client.create_producer(one, access_mode=pulsar.ProducerAccessMode.ExclusiveWithFencing)
f.send(b"f")
try:
    for _ in range(50):
        x.send(b"x again")
    raise AssertionError("a fenced producer kept sending")
except pulsar.ProducerFenced:
    pass
f.close()
print("producer access modes (Exclusive, ExclusiveWithFencing): ok")

# Deduplication (a namespace policy): a resend is stored once and answered
# with the original id; a producer of the same name resumes after it.
ok("PUT", f"/namespaces/{tenant}/dedup")
ok("POST", f"/namespaces/{tenant}/dedup/deduplication", "true")
dt = f"persistent://{tenant}/dedup/once"
dc = client.subscribe(dt, "s")
dp = client.create_producer(dt, producer_name="writer", batching_enabled=False)
ids = [dp.send(f"m{i}".encode(), sequence_id=i) for i in range(5)]
again = dp.send(b"m2 again", sequence_id=2)
assert (again.ledger_id(), again.entry_id()) == (ids[2].ledger_id(), ids[2].entry_id()), (again, ids[2])
dp.close()
dp = client.create_producer(dt, producer_name="writer", batching_enabled=False)
assert dp.last_sequence_id() == 4, dp.last_sequence_id()
dp.send(b"m5")
got = []
for _ in range(6):
    m = dc.receive(timeout_millis=10000)
    got.append(m.data().decode())
    dc.acknowledge(m)
assert got == [f"m{i}" for i in range(6)], got
try:
    m = dc.receive(timeout_millis=500)
    raise AssertionError(f"a duplicate was stored: {m.data()}")
except pulsar.Timeout:
    pass
# Off for this topic (a topic-level override): a resend is stored again.
ok("POST", f"/persistent/{tenant}/dedup/once/deduplicationEnabled", "false")
stored_again = False
for attempt in range(50):
    dp.send(b"resent", sequence_id=5)
    try:
        dc.acknowledge(dc.receive(timeout_millis=200))
        stored_again = True
        break
    except pulsar.Timeout:
        pass
assert stored_again, "the topic-level override did not turn deduplication off"
dp.close()
dc.close()
print("deduplication: a resend stored once with its original id; topic override: ok")

# Broker-side dead letters: a client with no dead-letter policy of its own.
ok("PUT", f"/namespaces/{tenant}/dlq")
ok("POST", f"/namespaces/{tenant}/dlq/deadLetterPolicy", {"maxRedeliverCount": 2})
wt = f"persistent://{tenant}/dlq/work"
wc = client.subscribe(wt, "s", consumer_type=pulsar.ConsumerType.Shared,
                      negative_ack_redelivery_delay_ms=100)
dq = client.subscribe(wt + "-s-DLQ", "inspect")
wp = client.create_producer(wt)
wp.send(b"poison")
counts = []
while True:
    try:
        m = wc.receive(timeout_millis=3000)
    except pulsar.Timeout:
        break
    counts.append(m.redelivery_count())
    wc.negative_acknowledge(m)
assert counts == [0, 1, 2], counts
d = dq.receive(timeout_millis=10000)
assert d.data() == b"poison", d.data()
assert d.properties()["REAL_TOPIC"] == wt, d.properties()
for x in (wc, dq, wp):
    x.close()
print("broker-side dead letters after 2 redeliveries: ok")

# Message TTL: unacknowledged messages expire.
ok("POST", f"/namespaces/{tenant}/dlq/messageTTL", "1")
assert ok("GET", f"/namespaces/{tenant}/dlq/messageTTL", want=200) == 1

# Non-persistent topics: live fan-out to the connected consumers.
np_topic = f"non-persistent://{tenant}/app/live"
np_a = client.subscribe(np_topic, "a")
np_b = client.subscribe(np_topic, "b")
np_p = client.create_producer(np_topic, batching_enabled=False)
for i in range(50):
    np_p.send(f"{i}".encode())
for c in (np_a, np_b):
    assert [int(c.receive(timeout_millis=5000).data()) for _ in range(50)] == list(range(50))
np_stats = ok("GET", f"/non-persistent/{tenant}/app/live/stats", want=200)
assert np_stats["msgInCounter"] == 50 and np_stats["storageSize"] == 0, np_stats
for x in (np_a, np_b, np_p):
    x.close()
print("non-persistent topic: live fan-out to two subscriptions, nothing stored: ok")

# Schemas: registered by the first producer, incompatible ones refused.
from pulsar.schema import Record, String, Integer, JsonSchema, StringSchema


class User(Record):
    name = String()
    age = Integer()


class UserV2(Record):
    name = String()
    age = Integer()
    city = String()


class Broken(Record):
    name = String()
    age = String()


st = f"persistent://{tenant}/app/users"
sp = client.create_producer(st, schema=JsonSchema(User))
sc = client.subscribe(st, "s", schema=JsonSchema(User), initial_position=pulsar.InitialPosition.Earliest)
sp.send(User(name="ada", age=36))
m = sc.receive(timeout_millis=10000)
assert (m.value().name, m.value().age) == ("ada", 36)
got = ok("GET", f"/schemas/{tenant}/app/users/schema", want=200)
assert got["type"] == "JSON" and got["version"] == 0, got
# Python's records carry no field defaults: a field added is readable by
# old readers (FORWARD) but not the other way (Avro's rules).
try:
    client.create_producer(st, schema=JsonSchema(UserV2))
    raise AssertionError("a field without a default was accepted under FULL")
except pulsar.IncompatibleSchema:
    pass
ok("PUT", f"/namespaces/{tenant}/app/schemaCompatibilityStrategy", '"FORWARD"')
sp2 = client.create_producer(st, schema=JsonSchema(UserV2))
assert ok("GET", f"/schemas/{tenant}/app/users/schema", want=200)["version"] == 1
for bad in (JsonSchema(Broken), StringSchema()):
    try:
        client.create_producer(st, schema=bad)
        raise AssertionError(f"an incompatible schema was accepted: {bad}")
    except pulsar.IncompatibleSchema:
        pass
for x in (sp, sp2, sc):
    x.close()
print("schemas: versions registered, incompatible ones refused: ok")

# Compaction: a compacted reader gets the latest value of each key.
ct = f"persistent://{tenant}/app/table"
cp = client.create_producer(ct, batching_enabled=False)
for r in range(3):
    for k in range(5):
        cp.send(f"k{k}v{r}".encode(), partition_key=f"k{k}")
cp.send(b"", partition_key="k4")  # deletes k4
ok("PUT", f"/persistent/{tenant}/app/table/compaction")
for _ in range(100):
    if ok("GET", f"/persistent/{tenant}/app/table/compaction", want=200)["status"] == "SUCCESS":
        break
    time.sleep(0.1)
else:
    raise AssertionError("compaction did not finish")
reader = client.create_reader(ct, pulsar.MessageId.earliest, is_read_compacted=True)
seen = []
while reader.has_message_available():
    seen.append(reader.read_next(timeout_millis=5000).data().decode())
assert seen == [f"k{k}v2" for k in range(4)], seen
for x in (reader, cp):
    x.close()
print("compaction: a compacted reader gets the latest value of each key: ok")

# Deleting: partitioned topics, the topics, then namespaces and the tenant.
ok("DELETE", f"/persistent/{tenant}/app/orders/partitions")
ok("DELETE", f"/persistent/{tenant}/app/one-writer?force=true")
ok("DELETE", f"/persistent/{tenant}/app/users?force=true")
ok("DELETE", f"/persistent/{tenant}/app/table?force=true")
ok("DELETE", f"/persistent/{tenant}/auto/fresh/partitions")
ok("DELETE", f"/persistent/{tenant}/strict/known")
ok("DELETE", f"/persistent/{tenant}/dedup/once")
ok("DELETE", f"/persistent/{tenant}/dlq/work")
ok("DELETE", f"/persistent/{tenant}/dlq/work-s-DLQ?force=true")  # the broker's own producer is on it
for ns in ("app", "auto", "strict", "dedup", "dlq"):
    ok("DELETE", f"/namespaces/{tenant}/{ns}")
ok("DELETE", f"/tenants/{tenant}")
client.close()
print("tenants, namespaces and partitioned topics through REST: ok")
