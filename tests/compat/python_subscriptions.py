"""Compatibility: subscription types with the official Python pulsar-client.
Failover: the consumer first by name is active and alone receives; the
standby receives nothing until the active one leaves, then takes over with
what it left unacknowledged (redelivered, counted) and the rest, in order.
Usage: python_subscriptions.py SERVICE_URL"""
import sys
import time
import uuid

import pulsar

url = sys.argv[1]
client = pulsar.Client(url, operation_timeout_seconds=20)


def nothing_within(consumer, ms):
    try:
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


taken_over = failover()
client.close()
print(f"python subscriptions ok: failover takeover with {taken_over} messages")
