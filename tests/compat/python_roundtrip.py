"""Compatibility: the official Python pulsar-client produces and consumes
against Magnetar (batching on, keys and properties), then reads what our own
CLI produced. Usage: python_roundtrip.py SERVICE_URL"""
import sys
import uuid

import pulsar

url = sys.argv[1]
topic = "persistent://public/default/py-compat-" + uuid.uuid4().hex[:8]
client = pulsar.Client(url, operation_timeout_seconds=20)
consumer = client.subscribe(topic, "py-sub", consumer_type=pulsar.ConsumerType.Shared,
                            initial_position=pulsar.InitialPosition.Earliest)
producer = client.create_producer(topic, batching_enabled=True, batching_max_messages=50,
                                  batching_max_publish_delay_ms=5)
sent = {}
for i in range(200):
    body = f"py-{i}".encode()
    sent[body] = (f"key-{i % 5}", {"i": str(i)})
    producer.send_async(body, None, partition_key=f"key-{i % 5}", properties={"i": str(i)})
producer.flush()
msg_id = producer.send(b"sync-one", partition_key="key-sync")
sent[b"sync-one"] = ("key-sync", {})
got = {}
while len(got) < len(sent):
    m = consumer.receive(timeout_millis=10000)
    got[m.data()] = (m.partition_key(), m.properties())
    consumer.acknowledge(m)
for body, (key, props) in sent.items():
    assert body in got, f"missing {body}"
    assert got[body][0] == key, f"{body}: key {got[body][0]} != {key}"
    assert got[body][1] == props, f"{body}: properties {got[body][1]} != {props}"
producer.close()
consumer.close()

# A reader-style check of ordering with an exclusive subscription.
c2 = client.subscribe(topic, "py-excl", initial_position=pulsar.InitialPosition.Earliest)
first = c2.receive(timeout_millis=10000)
assert first.data() == b"py-0", first.data()
c2.close()
client.close()
print(f"python compat ok: {len(got)} messages round-tripped")
