#!/usr/bin/env python3
"""Salt's own job-cache reader functions, pointed at a database saltpipe wrote.

Run with the Salt venv's python (scripts/salt-venv.sh). Loads the real
returner module (saltext-mysql's `mysql`, or Salt's `pgjsonb`), gives it
the options a master would, and calls get_load / get_jid for each --jid,
get_jids, get_fun for each --fun and get_minions. Prints one JSON document:

    {"load": {jid: ...}, "jid": {jid: {minion: full_ret}}, "jids": {...},
     "fun": {fun: {minion: full_ret}}, "minions": [...]}
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["mysql", "pgjsonb"], required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--user", default="root")
    ap.add_argument("--jid", action="append", default=[])
    ap.add_argument("--fun", action="append", default=[])
    a = ap.parse_args()

    if a.backend == "mysql":
        from saltext.mysql.returners import mysql as ret
        port = a.port or 3306
    else:
        from salt.returners import pgjsonb as ret
        port = a.port or 5432
    name = a.backend
    opts = {"id": "reader"}
    for k, v in {"host": a.host, "port": port, "user": a.user, "pass": "None", "db": a.db}.items():
        # Both spellings a master accepts: "<returner>.<key>" and "returner.<returner>.<key>".
        opts[f"{name}.{k}"] = v
        opts[f"returner.{name}.{k}"] = v
    ret.__opts__ = opts
    ret.__salt__ = {}
    ret.__context__ = {}

    out = {
        "load": {j: ret.get_load(j) for j in a.jid},
        "jid": {j: ret.get_jid(j) for j in a.jid},
        "jids": ret.get_jids(),
        "fun": {f: ret.get_fun(f) for f in a.fun},
        "minions": sorted(ret.get_minions()),
    }
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    sys.exit(main())
