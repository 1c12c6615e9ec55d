#!/usr/bin/env python3
"""CPU seconds (user + system) the processes with the given names have used
so far, their reaped children included: PostgreSQL runs a process per
connection, whose time ends up in the postmaster's cutime/cstime.

    scripts/server-cpu.py postgres            # or mariadbd,mysqld

Read before and after a run, with the client's own CPU beside it, it says
whether the run was CPU-bound on this machine's cores (client and server
share them) and how much server work each row cost (docs/BENCHMARKS.md).
"""
import os
import sys

names = sys.argv[1].split(",") if len(sys.argv) > 1 else []
tck = os.sysconf("SC_CLK_TCK")
total = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() not in names:
                continue
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    except OSError:
        pass  # the process ended between the listing and the read
print(f"{total / tck:.2f}")
