"""Draws what `magnetar perf produce --histogram-out FILE` wrote: throughput
over time (FILE.series.csv) and the publish latency percentile curve (FILE),
one line per run given.

usage: scripts/plot-perf.sh OUT_PREFIX LABEL=FILE [LABEL=FILE ...]
   (the .sh wrapper installs matplotlib into .venv; writes
    OUT_PREFIX-throughput.png and OUT_PREFIX-latency.png)
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FixedFormatter  # noqa: E402


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    if not runs:
        sys.exit(__doc__)

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, path in runs:
        s = rows(path + ".series.csv")
        ax.plot([float(r["second"]) for r in s], [float(r["msg_per_s"]) / 1000 for r in s], label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("thousand messages / s")
    ax.set_title("publish throughput over time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + "-throughput.png", dpi=100)

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, path in runs:
        h = [r for r in rows(path) if float(r["percentile"]) < 1.0]
        # x: 1 / (1 - p), so 90, 99, 99.9 % are evenly spaced.
        ax.plot([1 / (1 - float(r["percentile"])) for r in h], [float(r["latency_ms"]) for r in h], label=label)
    ax.set_xscale("log")
    ticks = [2, 10, 100, 1000, 10000]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(["50 %", "90 %", "99 %", "99.9 %", "99.99 %"]))
    ax.set_xlabel("percentile")
    ax.set_ylabel("publish latency, ms")
    ax.set_title("publish latency by percentile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + "-latency.png", dpi=100)
    print(f"wrote {out}-throughput.png and {out}-latency.png")


main()
