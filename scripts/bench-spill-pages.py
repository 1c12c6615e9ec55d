#!/usr/bin/env python3
"""Appends into new files against appends over recycled ones, while another
file grows beside them (the SQLite sink's database during a burst).

Why the embedded queue recycles its spent spill files
(src/queue/embedded/spill.rs): writing over pages the page cache holds is
a copy, while a new file's pages must be allocated first, and on a VM whose
freed memory goes back to the host (virtio-balloon free page reporting)
every new page is also a fault there.

    python3 scripts/bench-spill-pages.py [DIR] [ROUNDS] [SECONDS]

DIR (default: a temporary directory under the current one, so on the disk
the queue would use), ROUNDS of each mode alternated (default 2), SECONDS
per run (default 20). Each run: the writer appends 8 MiB (the queue
writer's largest transaction) every 60 ms into 64 MiB files (the spill
files' rotation) whose spent ones go 3 s after they fill (the worker's lag);
"new" deletes them and creates each next file, "recycle" renames a spent one
and writes over it from its start. Meanwhile a second process appends 4 MiB
every 20 ms to a file of its own (about 200 MB/s of new pages). Prints one
line per run: the append's median, 90th percentile and slowest latency, and
the mean rate.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

MB = 1 << 20
FILE_BYTES = 64 * MB
APPEND = 8 * MB
LAG = 3.0


def grow(path, seconds):
    buf = os.urandom(4 * MB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start, i = time.time(), 0
    while time.time() - start < seconds:
        os.pwrite(fd, buf, i * len(buf))
        i += 1
        time.sleep(0.02)
    os.close(fd)
    os.unlink(path)


def spill(d, mode, seconds):
    buf = os.urandom(APPEND)
    spent, took, number = [], [], 0

    def next_file():
        nonlocal number
        number += 1
        path = os.path.join(d, f"spill-{number}.dat")
        if mode == "recycle" and spent and time.time() - spent[0][0] > LAG:
            os.rename(spent.pop(0)[1], path)
            return path, os.open(path, os.O_WRONLY)
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    path, fd = next_file()
    off, start = 0, time.time()
    while time.time() - start < seconds:
        t = time.perf_counter()
        os.pwrite(fd, buf, off)
        took.append(time.perf_counter() - t)
        off += APPEND
        if off >= FILE_BYTES:
            os.close(fd)
            spent.append((time.time(), path))
            path, fd = next_file()
            off = 0
        if mode == "new":
            while spent and time.time() - spent[0][0] > LAG:
                os.unlink(spent.pop(0)[1])
        time.sleep(0.06)
    os.close(fd)
    for _, p in spent:
        os.unlink(p)
    os.unlink(path)
    ms = sorted(x * 1000 for x in took)
    return (statistics.median(ms), ms[int(len(ms) * 0.9)], ms[-1],
            APPEND / MB * len(took) / sum(took))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--grow":
        grow(sys.argv[2], float(sys.argv[3]))
        return
    d = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="spill-pages.", dir=".")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 20
    print("| files | append median ms | p90 ms | slowest ms | mean MB/s |")
    print("|---|---|---|---|---|")
    for _ in range(rounds):
        for mode in ("new", "recycle"):
            grower = subprocess.Popen(
                [sys.executable, __file__, "--grow", os.path.join(d, "grow.dat"), str(seconds + 1)])
            med, p90, worst, rate = spill(d, mode, seconds)
            grower.wait()
            print(f"| {mode} | {med:.1f} | {p90:.1f} | {worst:.1f} | {rate:.0f} |", flush=True)
            time.sleep(3)


if __name__ == "__main__":
    main()
