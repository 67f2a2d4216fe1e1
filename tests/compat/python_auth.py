"""Token authentication with the official Python client against a
standalone started with --auth-token-secret-key: a token made by
`magnetar tokens create` lets it in, none or a wrong one does not.

usage: python_auth.py PULSAR_URL GOOD_TOKEN WRONG_TOKEN
"""

import sys

import pulsar

URL, GOOD, WRONG = sys.argv[1], sys.argv[2], sys.argv[3]

client = pulsar.Client(URL, authentication=pulsar.AuthenticationToken(GOOD))
consumer = client.subscribe("secured", "py")
producer = client.create_producer("secured")
producer.send(b"with a token")
m = consumer.receive(timeout_millis=10000)
assert m.data() == b"with a token", m.data()
consumer.acknowledge(m)
client.close()

for auth in [None, pulsar.AuthenticationToken(WRONG)]:
    c = pulsar.Client(URL, authentication=auth, operation_timeout_seconds=5) if auth else \
        pulsar.Client(URL, operation_timeout_seconds=5)
    try:
        c.create_producer("secured")
    except Exception as e:  # the client's error for a refused CONNECT
        print(f"refused as it should be: {type(e).__name__}")
    else:
        raise AssertionError("a client without a valid token got in")
    finally:
        c.close()
print("token authentication with the Python client: ok")
