"""Prints a base port B such that B..B+N-1 are free on 127.0.0.1 for both TCP
and UDP (for scripts that number a cluster's ports from a base).
The base is taken below the kernel's ephemeral range: ports the system
hands out for outgoing connections would otherwise land on a cluster's
ports that are not bound yet (a broker added later, say).
Usage: free-ports.py N"""
import random
import socket
import sys

n = int(sys.argv[1])
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
except (OSError, ValueError, IndexError):
    ephemeral_low = 32768
low, high = 10000, max(10000 + n + 1, ephemeral_low - n)
for _ in range(500):
    base = random.randrange(low, high)
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
