"""Compatibility through ownership changes: the official Python pulsar-client,
given every broker in a multi-host service URL, produces to and consumes from
many topics while brokers of a local cluster are killed (-9), restarted,
stopped gracefully (SIGTERM), frozen past their lease (SIGSTOP, then
SIGCONT) and added. Every message the client saw
acknowledged must be delivered; per-topic order is kept.

Usage: python_failover.py SERVICE_URL CLUSTER_SCRIPT CLUSTER_DIR"""
import subprocess
import sys
import threading
import time

import pulsar

url, script, cluster_dir = sys.argv[1], sys.argv[2], sys.argv[3]
TOPICS = 8


def cluster(*args):
    subprocess.run([script, *args, "--dir", cluster_dir], check=True,
                   stdout=subprocess.DEVNULL)


client = pulsar.Client(url, operation_timeout_seconds=30,
                       logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
topics = [f"persistent://public/default/py-failover-{i}" for i in range(TOPICS)]
consumers = [client.subscribe(t, "checker", initial_position=pulsar.InitialPosition.Earliest,
                              consumer_type=pulsar.ConsumerType.Exclusive)
             for t in topics]
producers = [client.create_producer(t, batching_enabled=True, batching_max_publish_delay_ms=5,
                                    send_timeout_millis=60000)
             for t in topics]
acked = [set() for _ in topics]
failed = [0]
lock = threading.Lock()


def on_sent(t, i):
    def cb(res, _msg_id):
        with lock:
            if res == pulsar.Result.Ok:
                acked[t].add(i)
            else:
                failed[0] += 1
    return cb


stop = threading.Event()


def produce():
    i = 0
    while not stop.is_set():
        for t, p in enumerate(producers):
            p.send_async(f"{t}:{i}".encode(), on_sent(t, i))
        i += 1
        time.sleep(0.02)


thread = threading.Thread(target=produce)
thread.start()
steps = [(3, ("kill", "broker-1", "--signal", "KILL")), (3, ("start", "broker-1")),
         (3, ("kill", "broker-2", "--signal", "TERM")), (3, ("start", "broker-2")),
         (3, ("kill", "broker-3", "--signal", "STOP")), (8, ("kill", "broker-3", "--signal", "CONT")),
         (3, ("add", "broker"))]
for pause, step in steps:
    time.sleep(pause)
    cluster(*step)
time.sleep(5)
stop.set()
thread.join()
for p in producers:
    p.flush()

for t, c in enumerate(consumers):
    seen, last = set(), -1
    while True:
        try:
            m = c.receive(timeout_millis=5000)
        except pulsar.Timeout:
            break
        topic_index, i = map(int, m.data().decode().split(":"))
        assert topic_index == t
        if i not in seen:
            assert i > last, f"topic {t}: {i} after {last}"
            last = i
        seen.add(i)
        c.acknowledge(m)
    lost = acked[t] - seen
    assert not lost, f"topic {t}: {len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
total = sum(len(a) for a in acked)
assert total > 0
client.close()
print(f"python through kill -9, restart, SIGTERM, SIGSTOP past the lease and an added broker: {total} acknowledged, "
      f"0 lost, {failed[0]} failed sends")
