"""Our Rust SDK (through the magnetar CLI) and the official Python client on
the same topics: a key lands on the same partition whichever client sends it
(Java's JavaStringHash and Murmur3_32Hash schemes), and every compression
codec written by one is read by the other with keys and properties intact.

The Python client routes keys with the C++ core's BoostHash and does not
offer Java's schemes, so here it routes with a `message_router` computing
them (written from the Java algorithms); the Rust SDK must agree with it.

The typed JSON example of the SDK (client/examples/typed_json.rs) and
Python's JsonSchema records share a topic and its registered schema.

usage: python_sdk_interop.py PULSAR_URL HTTP_URL MAGNETAR_BIN TYPED_JSON_EXAMPLE
"""

import json
import re
import subprocess
import sys
import urllib.request

import pulsar
import pulsar.schema

URL, HTTP, BIN, TYPED = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
NS = "persistent://public/default"


def magnetar(*args):
    out = subprocess.run(
        [BIN, *args, "--service-url", URL],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout


def partitioned(name, n):
    req = urllib.request.Request(
        f"{HTTP}/admin/v2/persistent/public/default/{name}/partitions",
        data=str(n).encode(),
        method="PUT",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(req).read()


def java_string_hash(key):
    h = 0
    data = key.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i:i + 2], "big")) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


def murmur3_32(key, seed=0):
    data = key.encode("utf-8")
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & mask
    h = seed
    n = len(data) // 4 * 4
    for i in range(0, n, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = rotl((k * c1) & mask, 15) * c2 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    tail = data[n:]
    if tail:
        k = int.from_bytes(tail, "little")
        h ^= rotl((k * c1) & mask, 15) * c2 & mask
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h & 0x7FFFFFFF


assert java_string_hash("hello") == 99162322
assert murmur3_32("hello") == 0x248BFA47


def partition_of(topic_name):
    return int(topic_name.rsplit("-partition-", 1)[1])


def same_partitions_for_keys(client):
    keys = [f"key-{i}" for i in range(40)] + ["ü-ñ", "😀", "a much longer key than the others"]
    for scheme, flag in [(java_string_hash, "java-string-hash"), (murmur3_32, "murmur3")]:
        topic = f"{NS}/interop-keys-{flag}"
        partitioned(topic.rsplit("/", 1)[1], 7)
        consumer = client.subscribe(
            topic, "check", initial_position=pulsar.InitialPosition.Earliest
        )
        producer = client.create_producer(
            topic,
            batching_enabled=False,
            message_router=lambda msg, n, hash=scheme: hash(msg.partition_key()) % n,
        )
        for k in keys:
            producer.send(b"python", partition_key=k)
        producer.close()
        magnetar("produce", topic, "-m", "rust", "--keys", ",".join(keys), "--hashing", flag)
        seen = {}
        for _ in range(2 * len(keys)):
            m = consumer.receive(timeout_millis=10000)
            seen.setdefault(m.partition_key(), {})[m.data().decode()] = partition_of(m.topic_name())
            consumer.acknowledge(m)
        for k in keys:
            got = seen[k]
            assert got["python"] == got["rust"], (flag, k, got)
        spread = {v["rust"] for v in seen.values()}
        assert len(spread) >= 5, (flag, spread)
        consumer.close()
    print("a key picks the same partition from the Rust SDK and the Python client: ok")


CODECS = [
    (pulsar.CompressionType.LZ4, "lz4"),
    (pulsar.CompressionType.ZLib, "zlib"),
    (pulsar.CompressionType.ZSTD, "zstd"),
    (pulsar.CompressionType.SNAPPY, "snappy"),
]
BODY = "interoperable " * 200


def codecs_both_ways(client):
    for codec, flag in CODECS:
        for batched in [False, True]:
            topic = f"{NS}/interop-{flag}-{'batched' if batched else 'single'}"
            # Rust writes, Python reads.
            consumer = client.subscribe(
                topic, "py", initial_position=pulsar.InitialPosition.Earliest
            )
            args = ["produce", topic, "-m", BODY, "-n", "5", "-k", "kk", "-p", "origin=rust",
                    "--compression", flag]
            if batched:
                args.append("--batching")
            magnetar(*args)
            for _ in range(5):
                m = consumer.receive(timeout_millis=10000)
                assert m.data().decode() == BODY, (flag, batched, len(m.data()))
                assert m.partition_key() == "kk"
                assert m.properties() == {"origin": "rust"}, m.properties()
                consumer.acknowledge(m)
            consumer.close()
            # Python writes, Rust reads.
            producer = client.create_producer(
                topic, compression_type=codec, batching_enabled=batched
            )
            for _ in range(5):
                producer.send_async(BODY.encode(), None, partition_key="pk",
                                    properties={"origin": "python"})
            producer.flush()
            producer.close()
            out = magnetar("consume", topic, "-s", "rust", "-n", "10", "--position", "earliest",
                           "--timeout-secs", "10", "--json")
            lines = [json.loads(x) for x in out.splitlines()]
            from_python = [x for x in lines if x["properties"].get("origin") == "python"]
            assert len(from_python) == 5, (flag, batched, lines)
            for x in from_python:
                assert x["payload"] == BODY and x["key"] == "pk", (flag, batched, x)
    print("every codec, batched or not, from Rust to Python and back: ok")


class Order(pulsar.schema.Record):
    id = pulsar.schema.Long()
    item = pulsar.schema.String()


def typed_json_both_ways(client):
    topic = f"{NS}/interop-json"
    schema = pulsar.schema.JsonSchema(Order)
    producer = client.create_producer(topic, schema=schema)
    for i in range(3):
        producer.send(Order(id=100 + i, item=f"from-python-{i}"))
    producer.close()
    # The Rust example registers the same schema, writes 4 orders and reads
    # all 7 (Python's too) as its own type.
    out = subprocess.run([TYPED, URL, topic, "4"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    assert "read 7 orders" in out, out
    assert 'order Some(102): Some("from-python-2")' in out, out
    consumer = client.subscribe(topic, "py", schema=schema,
                                initial_position=pulsar.InitialPosition.Earliest)
    got = []
    for _ in range(7):
        m = consumer.receive(timeout_millis=10000)
        got.append((m.value().id, m.value().item))
        consumer.acknowledge(m)
    assert (3, "item-3") in got and (100, "from-python-0") in got, got
    consumer.close()
    print("typed JSON records from the Rust SDK and Python's JsonSchema, one schema: ok")


def chunks_both_ways(client):
    topic = f"{NS}/interop-chunks"
    consumer = client.subscribe(topic, "py", initial_position=pulsar.InitialPosition.Earliest)
    body = "".join(chr(65 + (i * 7) % 26) for i in range(100_000))
    magnetar("produce", topic, "-m", body, "--chunk-max-size", "8000", "-k", "big")
    m = consumer.receive(timeout_millis=10000)
    assert m.data().decode() == body and m.partition_key() == "big", len(m.data())
    consumer.acknowledge(m)
    consumer.close()
    # Python chunks what is above the broker's 5 MiB maximum.
    producer = client.create_producer(topic, chunking_enabled=True, batching_enabled=False)
    huge = bytes((i * 31) % 251 for i in range(6 * 1024 * 1024))
    producer.send(huge, properties={"origin": "python"})
    producer.close()
    out = magnetar("consume", topic, "-s", "rust", "-n", "2", "--position", "earliest",
                   "--timeout-secs", "20", "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["payload"] == body, len(lines[0]["payload"])
    assert lines[1]["properties"] == {"origin": "python"}, lines[1]["properties"]
    assert len(lines[1]["payload"].encode("utf-8", "surrogateescape")) > 5 * 1024 * 1024
    print("chunked messages from the Rust SDK and from Python, joined by the other: ok")


def python_pattern_subscription(client):
    # GET_TOPICS_OF_NAMESPACE: Python's regex consumers list the namespace.
    for t in ["pyre-a", "pyre-b", "other-c"]:
        magnetar("produce", f"{NS}/{t}", "-m", t)
    c = client.subscribe(re.compile(f"{NS}/pyre-.*"), "pattern",
                         initial_position=pulsar.InitialPosition.Earliest)
    got = set()
    for _ in range(2):
        m = c.receive(timeout_millis=10000)
        got.add(m.data())
        c.acknowledge(m)
    assert got == {b"pyre-a", b"pyre-b"}, got
    c.close()
    print("a Python regex subscription over the namespace's topics: ok")


client = pulsar.Client(URL)
python_pattern_subscription(client)
chunks_both_ways(client)
same_partitions_for_keys(client)
codecs_both_ways(client)
typed_json_both_ways(client)
client.close()
