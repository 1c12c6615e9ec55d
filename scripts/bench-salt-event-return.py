#!/usr/bin/env python3
"""Salt's own mysql event_return path on a bus stream, for comparison.

Run with the Salt venv's python (scripts/salt-venv.sh). Reads a stream as
`saltpipe capture` / `saltpipe-gen` write it (bare frames back to back),
and hands the first --count events to saltext-mysql's `event_return`
exactly as the master's event-return process does: a list of
{"tag", "data"} dicts per call, --queue events per call (the master's
`event_return_queue`; 0, its default, means one call per event). Each
call is one transaction (the returner commits at the end of its `with`).

Prints one JSON line: events, seconds, events_per_s, calls.
"""
import argparse
import json
import sys
import time

import msgpack


def frames(path):
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        for obj in unpacker:
            body = obj["body"]
            if isinstance(body, str):
                body = body.encode()
            tag, _, data = body.partition(b"\n\n")
            yield tag.decode(), msgpack.unpackb(data, raw=False, strict_map_key=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stream", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3306)
    ap.add_argument("--user", default="root")
    ap.add_argument("--password", default="")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--only-returns", action="store_true",
                    help="only salt/job/*/ret/* events, the ones saltpipe keeps as returns")
    a = ap.parse_args()

    from saltext.mysql.returners import mysql as ret

    ret.__opts__ = {
        "id": "bench-master",
        "mysql.host": a.host,
        "mysql.port": a.port,
        "mysql.user": a.user,
        # An empty password would fall back to the returner default "salt"; "None" means none.
        "mysql.pass": a.password or "None",
        "mysql.db": a.db,
    }
    ret.__salt__ = {}
    ret.__context__ = {}

    events = []
    for tag, data in frames(a.stream):
        if a.only_returns and "/ret/" not in tag:
            continue
        events.append({"tag": tag, "data": data})
        if len(events) >= a.count:
            break
    per_call = a.queue if a.queue > 0 else 1
    calls = 0
    t0 = time.perf_counter()
    for i in range(0, len(events), per_call):
        ret.event_return(events[i : i + per_call])
        calls += 1
    dt = time.perf_counter() - t0
    print(json.dumps({
        "events": len(events),
        "seconds": dt,
        "events_per_s": len(events) / dt if dt > 0 else 0,
        "calls": calls,
    }))


if __name__ == "__main__":
    sys.exit(main())
