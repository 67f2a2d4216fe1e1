"""Compatibility: subscription types with the official Python pulsar-client.
Failover: the consumer first by name is active and alone receives; the
standby receives nothing until the active one leaves, then takes over with
what it left unacknowledged (redelivered, counted) and the rest, in order.
Key_Shared: every message once, each key on one consumer at a time and in
order, also for keys that move to a consumer that joins while the first
holds their earlier messages unacknowledged; sticky ranges that overlap
are refused with ConsumerAssignError. Readers (non-durable subscriptions)
from a message id, the earliest and the latest, has_message_available, and
seek by publish time and by message id. Delayed delivery (deliver_after)
on a Shared subscription. Negative acks redeliver with a growing count, and
the client's own dead-letter policy moves the message to its DLQ topic.
Batch index acks: the messages of a batch acknowledged one by one are not
delivered again.
Usage: python_subscriptions.py SERVICE_URL"""
import sys
import time
import uuid

import pulsar

url = sys.argv[1]
client = pulsar.Client(url, operation_timeout_seconds=20)


def nothing_within(consumer, ms):
    try:
        if isinstance(consumer, pulsar.Reader):
            m = consumer.read_next(timeout_millis=ms)
        else:
            m = consumer.receive(timeout_millis=ms)
    except pulsar.Timeout:
        return True
    raise AssertionError(f"unexpected message {m.data()}")


def failover():
    topic = "persistent://public/default/py-failover-" + uuid.uuid4().hex[:8]
    sub = "fo"
    common = dict(consumer_type=pulsar.ConsumerType.Failover,
                  initial_position=pulsar.InitialPosition.Earliest)
    # "b" first, then "a": "a" sorts first and becomes the active one.
    standby = client.subscribe(topic, sub, consumer_name="b", **common)
    active = client.subscribe(topic, sub, consumer_name="a", **common)
    producer = client.create_producer(topic, batching_enabled=False)
    for i in range(20):
        producer.send(f"m-{i}".encode())
    for i in range(10):
        m = active.receive(timeout_millis=10000)
        assert m.data() == f"m-{i}".encode(), m.data()
        if i < 5:
            active.acknowledge(m)
    assert nothing_within(standby, 1500), "the standby must receive nothing"
    time.sleep(0.5)  # acknowledgements are grouped for 100 ms
    active.close()
    got = []
    while len(got) < 15:
        m = standby.receive(timeout_millis=10000)
        got.append((m.data().decode(), m.redelivery_count()))
        standby.acknowledge(m)
    assert [g[0] for g in got] == [f"m-{i}" for i in range(5, 20)], got
    assert all(count >= 1 for _, count in got), f"redeliveries are counted: {got}"
    assert nothing_within(standby, 500)
    producer.close()
    standby.close()
    return len(got)


def drain(consumers, want, seen):
    """Receives from every consumer in turn until `want` messages came,
    acknowledging each; records (index, key) per consumer."""
    total = sum(len(v) for v in seen.values())
    deadline = time.time() + 60
    while total < want:
        assert time.time() < deadline, f"only {total} of {want} arrived"
        for name, c in consumers.items():
            try:
                m = c.receive(timeout_millis=100)
            except pulsar.Timeout:
                continue
            seen[name].append((int(m.data()), m.partition_key()))
            c.acknowledge(m)
            total += 1


def key_shared():
    topic = "persistent://public/default/py-key-shared-" + uuid.uuid4().hex[:8]
    ks = dict(consumer_type=pulsar.ConsumerType.KeyShared,
              initial_position=pulsar.InitialPosition.Earliest)
    c1 = client.subscribe(topic, "ks", consumer_name="c1", **ks)
    producer = client.create_producer(topic, batching_enabled=True,
                                      batching_type=pulsar.BatchingType.KeyBased,
                                      batching_max_publish_delay_ms=5)
    keys = [f"key-{k}" for k in range(20)]

    def send(first, end):
        for i in range(first, end):
            producer.send_async(str(i).encode(), None, partition_key=keys[i % len(keys)])
        producer.flush()

    send(0, 100)
    held = [c1.receive(timeout_millis=10000) for _ in range(40)]
    seen = {"c1": [(int(m.data()), m.partition_key()) for m in held], "c2": []}
    # c2 joins and takes half the hash range while c1 holds 40 messages
    # (and has the other 60 of every key in its queue) unacknowledged.
    c2 = client.subscribe(topic, "ks", consumer_name="c2", **ks)
    send(100, 200)
    for m in held:
        c1.acknowledge(m)
    drain({"c1": c1, "c2": c2}, 200, seen)
    for name, c in (("c1", c1), ("c2", c2)):
        assert nothing_within(c, 300), f"{name} got more than was sent"
    got = sorted(i for v in seen.values() for i, _ in v)
    assert got == list(range(200)), "every message exactly once"
    assert seen["c2"], "the newcomer got keys"
    for name, v in seen.items():
        for key in keys:
            order = [i for i, k in v if k == key]
            assert order == sorted(order), f"{name} got {key} out of order: {order}"
    for key in keys:
        on1 = [i for i, k in seen["c1"] if k == key]
        on2 = [i for i, k in seen["c2"] if k == key]
        if on1 and on2:
            assert max(on1) < min(on2), f"{key}: c2 got {min(on2)} before c1's {max(on1)}"
    moved = sum(1 for key in keys if any(k == key for _, k in seen["c2"]))
    c1.close()
    c2.close()

    # Sticky ranges: an overlap is refused.
    sticky = lambda ranges: pulsar.ConsumerKeySharedPolicy(
        key_shared_mode=pulsar.KeySharedMode.Sticky, sticky_ranges=ranges)
    s1 = client.subscribe(topic, "ks-sticky", key_shared_policy=sticky([(0, 30000)]), **ks)
    try:
        client.subscribe(topic, "ks-sticky", key_shared_policy=sticky([(20000, 40000)]), **ks)
        raise AssertionError("an overlapping sticky range was accepted")
    except pulsar.ConsumerAssignError:
        pass
    s2 = client.subscribe(topic, "ks-sticky", key_shared_policy=sticky([(30001, 65535)]), **ks)
    sticky_seen = {"s1": [], "s2": []}
    drain({"s1": s1, "s2": s2}, 200, sticky_seen)
    assert sorted(i for v in sticky_seen.values() for i, _ in v) == list(range(200))
    s1.close()
    s2.close()
    producer.close()
    return moved


def readers_and_seek():
    topic = "persistent://public/default/py-reader-" + uuid.uuid4().hex[:8]
    producer = client.create_producer(topic, batching_enabled=False)
    ids, after = [], []
    for i in range(10):
        ids.append(producer.send(f"r-{i}".encode()))
        after.append(int(time.time() * 1000))  # at or after r-i's publish time
        time.sleep(0.02)
    # A reader from a message id starts after it; one from the earliest at the first.
    r = client.create_reader(topic, ids[3])
    assert r.read_next(timeout_millis=10000).data() == b"r-4"
    r.close()
    r = client.create_reader(topic, pulsar.MessageId.earliest)
    got = [r.read_next(timeout_millis=10000).data() for _ in range(10)]
    assert got == [f"r-{i}".encode() for i in range(10)], got
    assert not r.has_message_available(), "read to the end"
    producer.send(b"r-10")
    assert r.has_message_available()
    assert r.read_next(timeout_millis=10000).data() == b"r-10"
    r.close()
    r = client.create_reader(topic, pulsar.MessageId.latest)
    assert nothing_within(r, 500), "a reader from the latest sees only new messages"
    producer.send(b"r-11")
    assert r.read_next(timeout_millis=10000).data() == b"r-11"
    r.close()
    # Seek a durable subscription by publish time and by message id.
    s = client.subscribe(topic, "seeker", initial_position=pulsar.InitialPosition.Earliest)
    for _ in range(12):
        s.acknowledge(s.receive(timeout_millis=10000))
    s.seek(after[5])
    assert s.receive(timeout_millis=10000).data() == b"r-6", "first published after the time"
    s.seek(pulsar.MessageId.earliest)
    assert s.receive(timeout_millis=10000).data() == b"r-0"
    s.close()
    producer.close()


def delayed():
    import datetime
    topic = "persistent://public/default/py-delayed-" + uuid.uuid4().hex[:8]
    c = client.subscribe(topic, "work", consumer_type=pulsar.ConsumerType.Shared)
    producer = client.create_producer(topic)
    t0 = time.time()
    producer.send(b"later", deliver_after=datetime.timedelta(seconds=2))
    producer.send(b"now")
    m = c.receive(timeout_millis=10000)
    assert m.data() == b"now", m.data()
    c.acknowledge(m)
    m = c.receive(timeout_millis=10000)
    waited = time.time() - t0
    assert m.data() == b"later" and waited >= 1.9, (m.data(), waited)
    c.acknowledge(m)
    c.close()
    producer.close()
    return waited


def nack_and_client_dead_letters():
    topic = "persistent://public/default/py-nack-" + uuid.uuid4().hex[:8]
    dlq = topic + "-work-DLQ"
    policy = pulsar.ConsumerDeadLetterPolicy(max_redeliver_count=2, dead_letter_topic=dlq)
    s = client.subscribe(topic, "work", consumer_type=pulsar.ConsumerType.Shared,
                         negative_ack_redelivery_delay_ms=200, dead_letter_policy=policy)
    d = client.subscribe(dlq, "dlq", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic)
    producer.send(b"poison")
    counts = []
    for _ in range(3):
        m = s.receive(timeout_millis=10000)
        counts.append(m.redelivery_count())
        s.negative_acknowledge(m)
    assert counts == [0, 1, 2], counts
    m = d.receive(timeout_millis=10000)
    assert m.data() == b"poison" and m.properties().get("REAL_TOPIC") == topic, m.properties()
    d.acknowledge(m)
    for c in (s, d, producer):
        c.close()
    return counts


def batch_index_acks():
    """Half the messages of one batch acknowledged one by one (the client's
    batch_index_ack_enabled): after the consumer leaves, only the other half
    comes back; once those are acknowledged, nothing does."""
    topic = "persistent://public/default/py-batch-ack-" + uuid.uuid4().hex[:8]
    common = dict(consumer_type=pulsar.ConsumerType.Shared,
                  initial_position=pulsar.InitialPosition.Earliest,
                  batch_index_ack_enabled=True)
    c = client.subscribe(topic, "bia", **common)
    producer = client.create_producer(topic, batching_enabled=True, batching_max_messages=10,
                                      batching_max_publish_delay_ms=1000)
    for i in range(10):
        producer.send_async(f"b-{i}".encode(), None)
    producer.flush()
    entries = set()
    for i in range(10):
        m = c.receive(timeout_millis=10000)
        assert m.data() == f"b-{i}".encode(), m.data()
        entries.add((m.message_id().ledger_id(), m.message_id().entry_id()))
        if i % 2 == 0:
            c.acknowledge(m)
    assert len(entries) == 1, f"one batch: {entries}"
    time.sleep(0.5)  # acknowledgements are grouped for 100 ms
    c.close()
    c = client.subscribe(topic, "bia", **common)
    got = []
    while True:
        try:
            m = c.receive(timeout_millis=2000)
        except pulsar.Timeout:
            break
        got.append(m.data().decode())
        c.acknowledge(m)
    assert got == [f"b-{i}" for i in range(1, 10, 2)], got
    time.sleep(0.5)
    c.close()
    c = client.subscribe(topic, "bia", **common)
    assert nothing_within(c, 1500), "every message of the batch is acknowledged"
    c.close()
    producer.close()
    return len(got)


taken_over = failover()
moved = key_shared()
readers_and_seek()
waited = delayed()
counts = nack_and_client_dead_letters()
redelivered = batch_index_acks()
client.close()
print(f"python subscriptions ok: failover takeover with {taken_over} messages; "
      f"key_shared: {moved} of 20 keys moved to a newcomer in order; sticky overlap refused; "
      f"readers from an id, the earliest and the latest; seek by time and id; "
      f"deliver_after=2s came after {waited:.2f} s; nacked redelivery counts {counts}, "
      f"then the client's dead-letter topic; batch index acks: {redelivered} of 10 came back")
