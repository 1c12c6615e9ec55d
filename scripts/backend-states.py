#!/usr/bin/env python3
"""What a PostgreSQL database's backends are doing during a run, sampled
from /proc every ~0.5 ms (docs/BENCHMARKS.md, issue 15): the share of the
time they run or wait for a core (R), wait for the client's next message
(S in epoll while `idle` or `idle in transaction`), or wait on I/O (D).
The window is from the first to the last sample where a backend was busy.

    scripts/backend-states.py DBNAME SECONDS &   # then start the run

Each sample is the sorted set of (state, kernel wait, activity) of the
backends not idle, so one session's states add up to 100%. The sampler is
Python and costs a part of a core itself: compare runs sampled the same way.
"""
import collections
import os
import sys
import time

db, seconds = sys.argv[1], float(sys.argv[2])
tag = f"postgres {db} ".encode()
deadline = time.time() + seconds


def backends():
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if tag in f.read():
                    out.append(p)
        except OSError:
            pass
    return out


samples, pids, listed = [], [], 0.0
while time.time() < deadline:
    if time.time() - listed > 0.5:
        pids, listed = backends(), time.time()
    states = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/wchan") as f:
                wchan = f.read().strip()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        # The process title ends with what the backend does: idle, INSERT,
        # BIND, COMMIT, or "idle in transaction" (last word: transaction).
        activity = title.rsplit(" ", 1)[-1]
        if activity != "idle" or st == "R":
            states.append((st, "" if st == "R" else wchan, activity))
    samples.append(tuple(sorted(states)) or (("-", "", "all idle"),))
    time.sleep(0.0005)
busy = [i for i, s in enumerate(samples) if s[0][2] != "all idle"]
if not busy:
    sys.exit(f"no backend of {db} was busy in {seconds} s")
samples = samples[busy[0] : busy[-1] + 1]
for states, n in collections.Counter(samples).most_common(12):
    print(f"{n / len(samples) * 100:5.1f}%  {states}")
print(f"{len(samples)} samples")
