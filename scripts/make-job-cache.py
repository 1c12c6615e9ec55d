#!/usr/bin/env python3
"""Write (or read back) a master job cache in Salt's own format, with Salt's own code.

Run with the Salt venv's python ($(scripts/salt-venv.sh)/bin/python):

    make-job-cache.py write --cachedir DIR --returns N [--minions M] [--hash-type sha256]
        writes DIR/jobs through salt.returners.local_cache (prep_jid,
        save_load, save_minions, returner: exactly what a master does for
        each job and return), N returns over N/M jobs of M minions each.
        Jobs cycle through test.ping, cmd.run (~1 KB output, some failing),
        a state.apply shaped return and a multi-function job. Prints
        {"jobs": J, "returns": N, "seconds": S}.

    make-job-cache.py read --cachedir DIR [--jid JID ...] [--summary]
        reads it back with local_cache.get_jids / get_load / get_jid, the
        functions behind `salt-run jobs.lookup_jid`, and prints
        {"jids": {jid: {"load": ..., "returns": {minion: {...}}}}}
        (with --summary only {"jobs": J, "returns": N}).
"""
import argparse
import datetime
import json
import sys
import time


def local_cache(cachedir, hash_type):
    import salt.returners.local_cache as lc

    lc.__opts__ = {
        "cachedir": cachedir,
        "hash_type": hash_type,
        "keep_jobs_seconds": 86400,
        "job_cache_store_endtime": False,
    }
    return lc


def state_return(i, fail):
    ret = {}
    for n in range(3):
        ok = not (fail and n == 2)
        ret[f"file_|-f{n}_|-/tmp/f{i}-{n}_|-managed"] = {
            "__id__": f"f{n}",
            "__run_num__": n,
            "__sls__": "bench",
            "changes": {} if n else {"diff": "New file"},
            "comment": "File updated" if ok else "Source file not found",
            "duration": 1.5 + n,
            "name": f"/tmp/f{i}-{n}",
            "result": ok,
            "start_time": "12:00:00.000000",
        }
    return ret


def job_of(i, jid, minion_ids):
    """(load, per-minion return load) for job i."""
    kind = i % 4
    base = {"jid": jid, "tgt": "*", "tgt_type": "glob", "user": "root", "ret": ""}
    if kind == 0:
        load = dict(base, fun="test.ping", arg=[])
        rets = {m: {"return": True, "retcode": 0, "success": True} for m in minion_ids}
    elif kind == 1:
        load = dict(base, fun="cmd.run", arg=[f"bench {i}"])
        out = ("line %d of a command's output\n" % i) * 30
        rets = {
            m: {"return": out[:900], "retcode": 3 if n % 7 == 0 else 0, "success": n % 7 != 0}
            for n, m in enumerate(minion_ids)
        }
    elif kind == 2:
        load = dict(base, fun="state.apply", arg=["bench"])
        rets = {
            m: {"return": state_return(i, n % 5 == 0), "retcode": 2 if n % 5 == 0 else 0,
                "success": n % 5 != 0, "out": "highstate"}
            for n, m in enumerate(minion_ids)
        }
    else:
        load = dict(base, fun=["test.ping", "test.echo"], arg=[[], ["hello"]])
        rets = {
            m: {"return": {"test.ping": True, "test.echo": "hello"},
                "retcode": {"test.ping": 0, "test.echo": 0},
                "success": {"test.ping": True, "test.echo": True}}
            for m in minion_ids
        }
    return load, rets


def cmd_write(a):
    lc = local_cache(a.cachedir, a.hash_type)
    minion_ids = [f"minion-{n:05d}" for n in range(a.minions)]
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    t0 = time.time()
    written = 0
    jobs = 0
    i = 0
    while written < a.returns:
        jid = (start + datetime.timedelta(seconds=i)).strftime("%Y%m%d%H%M%S%f")
        ids = minion_ids[: min(a.minions, a.returns - written)]
        load, rets = job_of(i, jid, ids)
        lc.prep_jid(passed_jid=jid)
        lc.save_load(jid, load, minions=ids)
        for m, r in rets.items():
            ret_load = dict(r, id=m, jid=jid, fun=load["fun"], fun_args=load["arg"], cmd="_return")
            lc.returner(ret_load)
            written += 1
        jobs += 1
        i += 1
    print(json.dumps({"jobs": jobs, "returns": written, "seconds": round(time.time() - t0, 2)}))


def plain(v):
    """JSON-safe copy (bytes as text)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def cmd_read(a):
    lc = local_cache(a.cachedir, a.hash_type)
    jids = a.jid or sorted(lc.get_jids())
    if a.summary:
        n = sum(len(lc.get_jid(j)) for j in jids)
        print(json.dumps({"jobs": len(jids), "returns": n}))
        return
    out = {j: {"load": plain(lc.get_load(j)), "returns": plain(lc.get_jid(j))} for j in jids}
    json.dump({"jids": out}, sys.stdout, sort_keys=True)
    print()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--cachedir", required=True)
    w.add_argument("--returns", type=int, required=True)
    w.add_argument("--minions", type=int, default=10)
    w.add_argument("--hash-type", default="sha256")
    r = sub.add_parser("read")
    r.add_argument("--cachedir", required=True)
    r.add_argument("--jid", action="append", default=[])
    r.add_argument("--summary", action="store_true")
    r.add_argument("--hash-type", default="sha256")
    a = ap.parse_args()
    {"write": cmd_write, "read": cmd_read}[a.cmd](a)


if __name__ == "__main__":
    main()
