"""Pulsar over TLS with the official Python client against a standalone
started with --broker-tls-port: trusting the standalone's CA (and checking
the host name) it produces and consumes over pulsar+ssl://; trusting
another CA it is refused.

usage: python_tls.py PULSAR_SSL_URL CA_PEM OTHER_CA_PEM
"""

import sys

import pulsar

URL, CA, OTHER = sys.argv[1], sys.argv[2], sys.argv[3]

client = pulsar.Client(URL, tls_trust_certs_file_path=CA, tls_validate_hostname=True)
consumer = client.subscribe("over-tls", "py", initial_position=pulsar.InitialPosition.Earliest)
producer = client.create_producer("over-tls")
for i in range(5):
    producer.send(f"tls-{i}".encode(), partition_key=f"k{i}")
for i in range(5):
    m = consumer.receive(timeout_millis=10000)
    assert m.data() == f"tls-{i}".encode(), m.data()
    assert m.partition_key() == f"k{i}", m.partition_key()
    consumer.acknowledge(m)
client.close()

c = pulsar.Client(URL, tls_trust_certs_file_path=OTHER, operation_timeout_seconds=5)
try:
    c.create_producer("over-tls")
except Exception as e:  # the handshake fails: the client's connect error
    print(f"refused as it should be: {type(e).__name__}")
else:
    raise AssertionError("a client trusting another CA connected")
finally:
    c.close()
print("TLS with the Python client: ok")
