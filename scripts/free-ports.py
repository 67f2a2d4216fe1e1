"""Prints a base port B such that B..B+N-1 are free on 127.0.0.1 for both TCP
and UDP (for scripts that number a cluster's ports from a base).
Usage: free-ports.py N"""
import socket
import sys

n = int(sys.argv[1])
for _ in range(200):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    base = s.getsockname()[1]
    s.close()
    if base + n > 65535:
        continue
    held = []
    try:
        for port in range(base, base + n):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                x = socket.socket(socket.AF_INET, kind)
                held.append(x)
                x.bind(("127.0.0.1", port))
        print(base)
        break
    except OSError:
        pass
    finally:
        for x in held:
            x.close()
else:
    sys.exit(f"no {n} consecutive free ports")
