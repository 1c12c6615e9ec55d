#!/usr/bin/env python3
"""Throwaway Salt master + N minions on loopback, for saltpipe's tests and demo.

Stdlib only, python3 >= 3.9. The Salt binaries come from a virtualenv given by
--venv or $SALTPIPE_SALT_VENV (make one with scripts/salt-venv.sh). Everything
lives under the directory --dir D:

    D/sandbox.json        state: ports, pids, paths (see `up`)
    D/etc/master          master config      (config_dir = D/etc)
    D/minions/<id>/minion minion configs     (one config dir per minion)
    D/root/...            master root_dir (sock_dir = D/root/var/run/salt/master)
    D/minions/<id>/root   minion root_dirs
    D/logs/*.log          daemon logs (+ *.stdout for the daemons' own output)
    D/srv/salt            file_roots (states `failing` and `passing`)

Subcommands (JSON on stdout or nothing; non-zero exit and a message on stderr
on failure):

    up --dir D [--minions 2 | --no-minions] [--ipc-mode ipc|tcp] [--timeout 90] [--venv V]
       [--master-opt KEY=VALUE ...] [--minion-opt KEY=VALUE ...] [--master-d]
    down --dir D
    stop-master --dir D            start-master --dir D [--timeout 90]
    stop-minion --dir D --id ID    start-minion --dir D --id ID [--timeout 90]
    salt      --dir D [--async] -- <salt args...>
    salt-run  --dir D -- <runner args...>
    salt-call --dir D --id ID -- <salt-call args...>
    wheel     --dir D -- <wheel function> [args...]
    status    --dir D

`salt` runs `salt -c D/etc --out=json --show-jid <args>` (deliberately NOT
--static: --static suppresses the jid line, and static/batch runs fire extra
salt/batch/* events plus a hidden discovery test.ping job on the bus). Salt
then prints "jid: <jid>" and one JSON document per minion; this script merges
them and prints

    {"jid": "<20-digit jid>", "return": {"minion-1": ..., "minion-2": ...}}

--no-jid prints only the merged return map; --raw runs with
`--out=json --static` and prints Salt's stdout unchanged (no jid).
With --async it runs `salt -c D/etc --async <args>` and prints
{"jid": "<jid>"} (parsed from "Executed command with job ID: <jid>").
`salt-run` and `salt-call` print Salt's --out=json stdout unchanged
(salt-call uses the minion's config dir: it runs as that minion).
`wheel` runs a wheel function through Salt's own salt.wheel.WheelClient on
the master's config (as salt-api's `wheel` client and scripts do: a
salt/wheel/<jid>/new and /ret on the bus, and a job in the master's job
cache) and prints the job's full return ({jid, fun, user, return, success,
...}) as JSON.

Exit codes of salt / salt-run / salt-call are passed through (Salt exits
non-zero when a minion fails or does not answer).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

STATE_FILE = "sandbox.json"


class SandboxError(Exception):
    """A failed step; `stuck` names the minions that never answered, whose
    logs are shown though they still run."""

    def __init__(self, msg, stuck=()):
        super().__init__(msg)
        self.stuck = tuple(stuck)


# A minion's (and a syndic's) authentication and reconnection, made quick
# for tests: Salt's defaults wait 10 s and more between tries.
FAST_RECONNECT = {
    "acceptance_wait_time": 1,
    "acceptance_wait_time_max": 2,
    "random_reauth_delay": 0,
    "recon_default": 500,
    "recon_max": 2000,
    "recon_randomize": False,
    "auth_timeout": 10,
    "auth_tries": 10,
}

def die(msg, code=1):
    print(f"salt-sandbox: error: {msg}", file=sys.stderr)
    sys.exit(code)


def info(msg):
    print(f"salt-sandbox: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------
# helpers


def free_ports(n):
    """Pick n distinct free TCP ports on 127.0.0.1 (bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # reap if it is our zombie child (only when we started it in this process)
    try:
        wpid, _ = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            return False
    except ChildProcessError:
        pass
    # a zombie of another parent still shows; check /proc state
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
        if st == "Z":
            return False
    except OSError:
        return False
    return True


def pgrp_alive(pgid):
    """True if any process is still in process group pgid."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # only zombies left?
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # rest: state ppid pgrp ...
        if int(rest[2]) == pgid and rest[0] != "Z":
            return True
    return False


def stop_group(pid, name, grace=15.0):
    """SIGTERM the process group led by pid (started with setsid), wait, SIGKILL."""
    if not pid:
        return
    if not pgrp_alive(pid) and not pid_alive(pid):
        return
    info(f"stopping {name} (pgid {pid})")
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pgrp_alive(pid) and not pid_alive(pid):
            return
        time.sleep(0.2)
    info(f"{name} did not exit after {grace:.0f}s, SIGKILL")
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (pgrp_alive(pid) or pid_alive(pid)):
        time.sleep(0.1)


def stop_many(items, grace=15.0):
    """Stop several (pid, name) groups in parallel: TERM all, then wait, then KILL."""
    live = [(p, n) for p, n in items if p and (pgrp_alive(p) or pid_alive(p))]
    for p, n in live:
        info(f"stopping {n} (pgid {p})")
        try:
            os.killpg(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        live = [(p, n) for p, n in live if pgrp_alive(p) or pid_alive(p)]
        if not live:
            return
        time.sleep(0.2)
    for p, n in live:
        info(f"{n} did not exit after {grace:.0f}s, SIGKILL")
        try:
            os.killpg(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pgrp_alive(p) for p, _ in live):
        time.sleep(0.1)


def yaml_scalar(v):
    # JSON is valid YAML; good enough for the config values we write.
    return json.dumps(v)


def write_config(path, conf):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for k, v in conf.items():
            f.write(f"{k}: {yaml_scalar(v)}\n")


# --------------------------------------------------------------------------
# state


def state_path(d):
    return os.path.join(d, STATE_FILE)


def load_state(d):
    p = state_path(d)
    if not os.path.exists(p):
        raise SandboxError(f"no sandbox at {d} ({p} missing; run `up` first)")
    with open(p) as f:
        return json.load(f)


def save_state(d, st):
    tmp = state_path(d) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, state_path(d))


def resolve_venv(args, st=None):
    v = getattr(args, "venv", None) or os.environ.get("SALTPIPE_SALT_VENV")
    if not v and st:
        v = st.get("venv")
    if not v:
        raise SandboxError("no Salt venv: pass --venv or set SALTPIPE_SALT_VENV "
                           "(scripts/salt-venv.sh prints one)")
    v = os.path.abspath(v)
    if not os.path.exists(os.path.join(v, "bin", "salt-master")):
        raise SandboxError(f"{v}/bin/salt-master not found")
    return v


def bin_path(st, name):
    return os.path.join(st["venv"], "bin", name)


def daemon_env(st):
    env = dict(os.environ)
    env["PATH"] = os.path.join(st["venv"], "bin") + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------
# config


FAILING_SLS = """\
passing_step:
  cmd.run:
    - name: "true"

failing_step:
  cmd.run:
    - name: "exit 1"

impossible_file:
  file.managed:
    - name: /proc/saltpipe-impossible/file
    - contents: nope
"""

PASSING_SLS = """\
passing_step:
  cmd.run:
    - name: "true"

echo_step:
  cmd.run:
    - name: "echo hello from state"
"""


# salt-syndic through Salt's own entry point, with one fix: Salt 3008.5's
# SyncWrapper cancels, after each synchronous call, the tasks it judges
# orphaned, the zeromq request client's send-queue reader among them, so
# only the syndic's first request up to the MoM is answered and no return
# of the syndic's minions ever reaches the MoM (../shared/SALT.md, "A syndic
# on loopback"). Releases without the check are started unchanged.
SYNDIC_LAUNCHER = """\
import sys
import salt.utils.asynchronous as asynchronous

if hasattr(asynchronous.SyncWrapper, "_task_is_orphan"):
    asynchronous.SyncWrapper._task_is_orphan = classmethod(lambda cls, task, exclude: False)

from salt.scripts import salt_syndic

sys.argv[0] = "salt-syndic"
sys.exit(salt_syndic())
"""


def parse_opts(pairs):
    """KEY=VALUE pairs; VALUE is parsed as JSON when it parses, else a string."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SandboxError(f"bad option {pair!r}: expected KEY=VALUE")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def build(d, venv, n_minions, ipc_mode, master_opts=None, minion_opts=None, master_d=False,
          prefix="minion", syndic_of=None, interface="127.0.0.1", peer=None):
    d = os.path.abspath(d)
    ports = free_ports(4 + n_minions)
    publish_port, ret_port, tcp_pub, tcp_pull = ports[:4]
    failover = (minion_opts or {}).get("master_type") == "failover"
    if peer is not None and failover:
        # A failover minion has one master_port and publish_port for every
        # master in its list: this master takes the peer's (on its own
        # address, so both can bind them).
        publish_port, ret_port = peer["publish_port"], peer["ret_port"]
    for sub in ("etc", "root", "logs", "srv/salt", "srv/pillar", "minions"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    root = os.path.join(d, "root")
    with open(os.path.join(d, "srv/salt/failing.sls"), "w") as f:
        f.write(FAILING_SLS)
    with open(os.path.join(d, "srv/salt/passing.sls"), "w") as f:
        f.write(PASSING_SLS)

    master_conf = {
        "id": "saltpipe-sandbox-master",
        "root_dir": root,
        "interface": interface,
        "publish_port": publish_port,
        "ret_port": ret_port,
        "auto_accept": True,
        "user": "root",
        "ipc_mode": ipc_mode,
        "tcp_master_pub_port": tcp_pub,
        "tcp_master_pull_port": tcp_pull,
        "tcp_master_publish_pull": free_ports(1)[0],
        "tcp_master_workers": free_ports(1)[0],
        "file_roots": {"base": [os.path.join(d, "srv/salt")]},
        "pillar_roots": {"base": [os.path.join(d, "srv/pillar")]},
        # relative to root_dir: Salt prefixes root_dir even to absolute paths
        "log_file": "../logs/master.log",
        "key_logfile": "../logs/key.log",
        "log_level_logfile": "info",
        "log_level": "warning",
        "timeout": 5,
        "gather_job_timeout": 10,
        "worker_threads": 2,
        "job_cache": True,
        "keep_jobs_seconds": 3600,
        "enable_gpu_grains": False,
        "fileserver_backend": ["roots"],
        "presence_events": False,
    }
    if syndic_of is not None:
        # This master is a syndic node under the master of masters (MoM)
        # whose sandbox state is syndic_of: salt-syndic connects up to the
        # MoM's ret_port and subscribes to its publish_port.
        master_conf.update({
            "syndic_master": "127.0.0.1",
            "syndic_master_port": syndic_of["ret_port"],
            "syndic_log_file": "../logs/syndic.log",
            "syndic_pidfile": "../logs/syndic.pid",
        })
    if master_d:
        # Salt reads <config_dir>/master.d/*.conf after the main file
        # (default_include): the options given go there instead.
        os.makedirs(os.path.join(d, "etc", "master.d"), exist_ok=True)
        write_config(os.path.join(d, "etc", "master.d", "sandbox.conf"), master_opts or {})
    else:
        master_conf.update(master_opts or {})
    write_config(os.path.join(d, "etc", "master"), master_conf)
    master_conf.update(master_opts or {})
    # runners run in-process (salt-run) and need this dir even with no master
    os.makedirs(os.path.join(rooted(root, master_conf.get("cachedir", "/var/cache/salt/master")),
                             "proc"), exist_ok=True)

    minions = {}
    for i in range(n_minions):
        mid = f"{prefix}-{i + 1}"
        mdir = os.path.join(d, "minions", mid)
        mroot = os.path.join(mdir, "root")
        os.makedirs(mroot, exist_ok=True)
        mconf = {
            "id": mid,
            "master": "127.0.0.1",
            "master_port": ret_port,
            "publish_port": publish_port,
            "root_dir": mroot,
            "user": "root",
            "ipc_mode": ipc_mode,
            "tcp_pub_port": ports[4 + i],
            "tcp_pull_port": free_ports(1)[0],
            "log_file": f"../../../logs/{mid}.log",
            "log_level_logfile": "info",
            "log_level": "warning",
            **FAST_RECONNECT,
            "master_tries": -1,
            "ping_interval": 0,
            "enable_gpu_grains": False,
            "grains_cache": True,
            "file_client": "remote",
            "multiprocessing": True,
        }
        if peer is not None:
            # Hot/hot multi-master: connected to this master and the peer
            # (on another loopback address, so that each return goes only to
            # the master that published the job); each master tells the
            # minion its own publish port.
            if failover:
                # Failover: one master at a time, the same ports on each.
                # Salt sets auth_tries to 0 for a failover minion, so one
                # sign-in slower than auth_timeout (a loaded machine) sends
                # it to the peer for good, and this master's test.ping never
                # reaches it: fail back to this master (first in the list)
                # once it answers, checked every few seconds. The checks
                # need master_alive_interval, which also notices this
                # master's end sooner when a test stops it.
                mconf["master"] = ["127.0.0.1", peer["interface"]]
                mconf.update({"master_alive_interval": 3, "master_failback": True,
                              "master_failback_interval": 3})
            else:
                mconf["master"] = [f"127.0.0.1:{ret_port}",
                                   f"{peer['interface']}:{peer['ret_port']}"]
                del mconf["publish_port"], mconf["master_port"]
        mconf.update(minion_opts or {})
        write_config(os.path.join(mdir, "minion"), mconf)
        minions[mid] = {"config_dir": mdir, "root_dir": mroot, "pid": None,
                        "log": os.path.join(d, "logs", f"{mid}.log")}

    syndic = None
    if syndic_of is not None:
        # salt-syndic reads <config_dir>/master overlaid with
        # <config_dir>/minion: its id, its pki (root/etc/salt/pki/minion)
        # and, without which it subscribes to its own master, the MoM's
        # publish_port.
        sid = master_conf["id"]
        write_config(os.path.join(d, "etc", "minion"), {
            "id": sid,
            "root_dir": root,
            "publish_port": syndic_of["publish_port"],
            **FAST_RECONNECT,
        })
        launcher = os.path.join(d, "syndic-launcher.py")
        with open(launcher, "w") as f:
            f.write(SYNDIC_LAUNCHER)
        syndic = {"id": sid, "of": syndic_of["dir"], "pid": None, "launcher": launcher,
                  "log": os.path.join(d, "logs", "syndic.log")}

    if peer is not None:
        # The masters of one multi-master set share a key pair.
        pki = rooted(root, master_conf.get("pki_dir", "/etc/salt/pki/master"))
        peer_pki = os.path.join(peer["root_dir"], "etc/salt/pki/master")
        os.makedirs(pki, exist_ok=True)
        for name in ("master.pem", "master.pub"):
            shutil.copy2(os.path.join(peer_pki, name), os.path.join(pki, name))

    sock_dir = rooted(root, master_conf.get("sock_dir", "/var/run/salt/master"))
    st = {
        "dir": d,
        "venv": venv,
        "ipc_mode": ipc_mode,
        "config_dir": os.path.join(d, "etc"),
        "root_dir": root,
        "sock_dir": sock_dir,
        "event_pub": os.path.join(sock_dir, "master_event_pub.ipc"),
        "event_pull": os.path.join(sock_dir, "master_event_pull.ipc"),
        "publish_port": publish_port,
        "ret_port": ret_port,
        "master_log": os.path.join(d, "logs", "master.log"),
        "master_pid": None,
        "minion_ids": sorted(minions, key=lambda m: int(m.rsplit("-", 1)[1])),
        "minions": minions,
        "file_roots": os.path.join(d, "srv/salt"),
        "states": {"failing": "failing.sls", "passing": "passing.sls"},
        "master_id": master_conf["id"],
        "interface": interface,
        "peer": peer["dir"] if peer is not None else None,
        "syndic": syndic,
    }
    if ipc_mode == "tcp":
        st["tcp_pub"] = master_conf["tcp_master_pub_port"]
        st["tcp_pull"] = master_conf["tcp_master_pull_port"]
    try:
        out = subprocess.run([os.path.join(venv, "bin", "salt-master"), "--version"],
                             capture_output=True, text=True, timeout=60)
        st["salt_version"] = out.stdout.strip().split()[1] if out.stdout.strip() else None
    except Exception:  # noqa: BLE001
        st["salt_version"] = None
    return st


def rooted(root, path):
    """A master path with root_dir in front, as Salt's prepend_root_dir does."""
    if path.startswith(root):
        return path
    return os.path.join(root, path.lstrip("/"))


# --------------------------------------------------------------------------
# daemons


def spawn(st, argv, out_name):
    logf = open(os.path.join(st["dir"], "logs", out_name), "ab")
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        env=daemon_env(st),
        start_new_session=True,  # setsid: own session and process group
        cwd=st["dir"],
    )
    logf.close()
    return p.pid


def start_master_proc(st):
    if st.get("master_pid") and pgrp_alive(st["master_pid"]):
        raise SandboxError(f"master already running (pid {st['master_pid']})")
    pid = spawn(st, [bin_path(st, "salt-master"), "-c", st["config_dir"], "-l", "warning"],
                "master.stdout")
    st["master_pid"] = pid
    return pid


def start_minion_proc(st, mid):
    m = st["minions"].get(mid)
    if m is None:
        raise SandboxError(f"no minion {mid!r}; have {st['minion_ids']}")
    if m.get("pid") and pgrp_alive(m["pid"]):
        raise SandboxError(f"{mid} already running (pid {m['pid']})")
    pid = spawn(st, [bin_path(st, "salt-minion"), "-c", m["config_dir"], "-l", "warning"],
                f"{mid}.stdout")
    m["pid"] = pid
    return pid


def start_syndic_proc(st):
    sy = st.get("syndic")
    if not sy:
        raise SandboxError("this sandbox is not a syndic node (up --syndic-of)")
    if sy.get("pid") and pgrp_alive(sy["pid"]):
        raise SandboxError(f"salt-syndic already running (pid {sy['pid']})")
    sy["pid"] = spawn(st, [bin_path(st, "python"), sy["launcher"], "-c", st["config_dir"],
                           "-l", "warning"], "syndic.stdout")
    return sy["pid"]


def wait_for(pred, timeout, what, step=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise SandboxError(f"timed out after {timeout:.0f}s waiting for {what}")


def master_ready(st):
    if st["ipc_mode"] == "tcp":
        s = socket.socket()
        try:
            s.settimeout(0.5)
            s.connect(("127.0.0.1", st["tcp_pub"]))
            return True
        except OSError:
            return False
        finally:
            s.close()
    return os.path.exists(st["event_pub"])


def check_daemons_alive(st, minion_ids):
    if not pid_alive(st["master_pid"]):
        raise SandboxError(f"salt-master exited; see {st['master_log']} and "
                           f"{st['dir']}/logs/master.stdout")
    for mid in minion_ids:
        pid = st["minions"][mid]["pid"]
        if not pid_alive(pid):
            raise SandboxError(f"{mid} exited; see {st['minions'][mid]['log']}")


def ping_all(st, minion_ids, timeout, via=None):
    """Wait until test.ping answers True from every given minion (sent by
    the master of `via`, a syndic node's MoM, else by this sandbox's)."""
    deadline = time.monotonic() + timeout
    pending = set(minion_ids)
    if not pending:
        return
    last_err = ""
    while pending and time.monotonic() < deadline:
        check_daemons_alive(st, minion_ids)
        if via is not None and st.get("syndic") and not pid_alive(st["syndic"].get("pid")):
            raise SandboxError(f"salt-syndic exited; see {st['syndic']['log']} and "
                               f"{st['dir']}/logs/syndic.stdout")
        tgt = ",".join(sorted(pending))
        # A ping to a minion that is not connected yet costs timeout +
        # gather_job_timeout inside the salt CLI; cut it short instead.
        p = subprocess.Popen(
            [bin_path(st, "salt"), "-c", (via or st)["config_dir"], "-L", tgt, "test.ping",
             "--out=json", "-t", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=daemon_env(st), start_new_session=True)
        try:
            out, err = p.communicate(timeout=max(2.0, min(6.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
            err = (err or "") + " [salt test.ping cut off after 6s]"
        last_err = (err or "").strip()[-400:]
        if p.returncode == 2 and "Usage:" in (err or ""):
            raise SandboxError(f"salt CLI usage error: {last_err}")
        data = parse_show_jid(out or "")[1] or {}
        for mid, val in data.items():
            if val is True:
                pending.discard(mid)
        if not pending:
            return
        time.sleep(1)
    if not pending:
        return
    raise SandboxError(f"timed out after {timeout:.0f}s waiting for test.ping from "
                       f"{sorted(pending)} (last stderr: {last_err!r})", stuck=pending)


# --------------------------------------------------------------------------
# subcommands


def cmd_up(args):
    d = os.path.abspath(args.dir)
    if os.path.exists(state_path(d)):
        try:
            old = load_state(d)
        except Exception:  # noqa: BLE001
            old = None
        if old and (pgrp_alive(old.get("master_pid"))
                    or any(pgrp_alive(m.get("pid")) for m in old["minions"].values())):
            raise SandboxError(f"sandbox at {d} is running; `down` it first")
    if os.geteuid() != 0:
        info("warning: not root; the sandbox config sets user: root")
    venv = resolve_venv(args)
    if args.no_minions:
        args.minions = 0
    os.makedirs(d, exist_ok=True)
    # A Salt daemon that dies during start-up (seen rarely in CI when two
    # sandboxes start at the same moment; the ports are picked free but
    # released before the daemons bind them) gets one more try on fresh
    # ports, with its log shown first so the cause is never hidden.
    for attempt in (1, 2):
        mom = load_state(os.path.abspath(args.syndic_of)) if args.syndic_of else None
        peer = load_state(os.path.abspath(args.peer)) if args.peer else None
        st = build(d, venv, args.minions, args.ipc_mode,
                   parse_opts(args.master_opt), parse_opts(args.minion_opt), args.master_d,
                   args.prefix, mom, args.interface, peer)
        save_state(d, st)
        try:
            start_master_proc(st)
            save_state(d, st)
            wait_for(lambda: (check_daemons_alive(st, []) or True) and master_ready(st),
                     args.timeout, "the master's event socket")
            for mid in st["minion_ids"]:
                start_minion_proc(st, mid)
            save_state(d, st)
            ping_all(st, st["minion_ids"], args.timeout)
            if mom is not None:
                start_syndic_proc(st)
                save_state(d, st)
                # Up when the MoM's own job reaches every minion below.
                ping_all(st, st["minion_ids"], args.timeout, via=mom)
            if peer is not None and parse_opts(args.minion_opt).get("master_type") != "failover":
                # Up when the peer master's job reaches every minion too
                # (hot/hot; a failover minion talks to one master at a time).
                ping_all(st, st["minion_ids"], args.timeout, via=peer)
            break
        except BaseException as e:
            info(f"up failed ({e}); cleaning up")
            show_exit_logs(st, getattr(e, "stuck", ()))
            do_down(st)
            save_state(d, st)
            if attempt == 2 or not isinstance(e, SandboxError) or "exited" not in str(e):
                raise
            info("a daemon exited during start-up; trying once more on fresh ports")
    st["started_at"] = time.time()
    save_state(d, st)
    print(json.dumps(st, indent=2, sort_keys=True))


def show_exit_logs(st, stuck=()):
    """The last lines of the log of every daemon that is no longer running,
    and of the minions in `stuck` (running, but never answered)."""
    logdir = os.path.join(st["dir"], "logs")
    logs = [(st.get("master_pid"), st.get("master_log")),
            (st.get("master_pid"), os.path.join(logdir, "master.stdout"))]
    if st.get("syndic"):
        sy = st["syndic"]
        logs += [(sy.get("pid"), sy.get("log")),
                 (sy.get("pid"), os.path.join(logdir, "syndic.stdout"))]
    for mid, m in st["minions"].items():
        logs += [(m.get("pid"), m.get("log")),
                 (m.get("pid"), os.path.join(logdir, f"{mid}.stdout"))]
    shown = {st["minions"][mid].get("log") for mid in stuck if mid in st["minions"]}
    for pid, log in logs:
        if pid and pid_alive(pid) and log not in shown or not log or not os.path.exists(log):
            continue
        try:
            with open(log, errors="replace") as f:
                tail = f.readlines()[-20:]
        except OSError:
            continue
        info(f"--- last lines of {log} ---")
        for line in tail:
            sys.stderr.write("    " + line)


def do_down(st):
    items = [(m.get("pid"), mid) for mid, m in st["minions"].items()]
    items.append((st.get("master_pid"), "salt-master"))
    if st.get("syndic"):
        items.append((st["syndic"].get("pid"), "salt-syndic"))
        st["syndic"]["pid"] = None
    stop_many(items, grace=15.0)
    for m in st["minions"].values():
        m["pid"] = None
    st["master_pid"] = None


def cmd_down(args):
    d = os.path.abspath(args.dir)
    if not os.path.exists(state_path(d)):
        return  # nothing to do: idempotent
    st = load_state(d)
    do_down(st)
    save_state(d, st)


def cmd_stop_master(args):
    d = os.path.abspath(args.dir)
    st = load_state(d)
    stop_group(st.get("master_pid"), "salt-master")
    st["master_pid"] = None
    save_state(d, st)


def cmd_start_master(args):
    d = os.path.abspath(args.dir)
    st = load_state(d)
    start_master_proc(st)
    save_state(d, st)
    wait_for(lambda: (check_daemons_alive(st, []) or True) and master_ready(st),
             args.timeout, "the master's event socket")
    running = [mid for mid in st["minion_ids"] if pgrp_alive(st["minions"][mid].get("pid"))]
    if running:
        ping_all(st, running, args.timeout)


def cmd_stop_minion(args):
    d = os.path.abspath(args.dir)
    st = load_state(d)
    if args.id not in st["minions"]:
        raise SandboxError(f"no minion {args.id!r}; have {st['minion_ids']}")
    stop_group(st["minions"][args.id].get("pid"), args.id)
    st["minions"][args.id]["pid"] = None
    save_state(d, st)


def cmd_start_minion(args):
    d = os.path.abspath(args.dir)
    st = load_state(d)
    start_minion_proc(st, args.id)
    save_state(d, st)
    if st.get("master_pid") and pgrp_alive(st["master_pid"]):
        ping_all(st, [args.id], args.timeout)


def cmd_status(args):
    d = os.path.abspath(args.dir)
    st = load_state(d)
    out = {"master": {"pid": st.get("master_pid"),
                      "running": bool(st.get("master_pid")) and pgrp_alive(st["master_pid"])},
           "minions": {mid: {"pid": m.get("pid"),
                             "running": bool(m.get("pid")) and pgrp_alive(m["pid"])}
                       for mid, m in st["minions"].items()}}
    print(json.dumps(out, indent=2, sort_keys=True))


def strip_dashdash(rest):
    if rest and rest[0] == "--":
        return rest[1:]
    return rest


JID_RE = re.compile(r"(?:job ID:|^jid:)\s*(\d{20}(?:_\d+)?)", re.M)


def parse_show_jid(text):
    """Parse `salt --out=json --show-jid` output (no --static, which hides the
    jid line): a "jid: <jid>" line, then one JSON document per minion.
    Returns (jid, merged dict or None, text without the jid line)."""
    jid = None
    lines = []
    for line in text.splitlines(True):
        m = re.match(r"^jid:\s*(\S+)\s*$", line)
        if m and jid is None:
            jid = m.group(1)
        else:
            lines.append(line)
    body = "".join(lines)
    dec = json.JSONDecoder()
    merged = {}
    i = 0
    try:
        while True:
            while i < len(body) and body[i].isspace():
                i += 1
            if i >= len(body):
                break
            doc, i = dec.raw_decode(body, i)
            if isinstance(doc, dict):
                merged.update(doc)
            else:
                merged.setdefault("_other", []).append(doc)
    except ValueError:
        return jid, None, body
    return jid, merged if body.strip() else None, body


def cmd_salt(args):
    st = load_state(os.path.abspath(args.dir))
    rest = strip_dashdash(args.rest)
    base = [bin_path(st, "salt"), "-c", st["config_dir"]]
    if args.async_:
        argv = base + ["--async"] + rest
        r = subprocess.run(argv, capture_output=True, text=True, env=daemon_env(st))
        sys.stderr.write(r.stderr)
        m = JID_RE.search(r.stdout)
        if r.returncode != 0 or not m:
            sys.stderr.write(r.stdout)
            die(f"salt --async failed (exit {r.returncode}): no jid in output", r.returncode or 1)
        print(json.dumps({"jid": m.group(1)}))
        return 0
    if args.raw:
        argv = base + rest + ["--out=json", "--static"]
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=daemon_env(st))
        sys.stdout.write(r.stdout)
        return r.returncode
    argv = base + rest + ["--out=json", "--show-jid"]
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=daemon_env(st))
    jid, parsed, body = parse_show_jid(r.stdout)
    if args.no_jid:
        print(json.dumps(parsed, indent=2, sort_keys=True) if parsed is not None else body)
    else:
        print(json.dumps({"jid": jid, "return": parsed}, indent=2, sort_keys=True))
    return r.returncode


def cmd_salt_run(args):
    st = load_state(os.path.abspath(args.dir))
    rest = strip_dashdash(args.rest)
    argv = [bin_path(st, "salt-run"), "-c", st["config_dir"], "--out=json"] + rest
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=daemon_env(st))
    sys.stdout.write(r.stdout)
    return r.returncode


def cmd_salt_call(args):
    st = load_state(os.path.abspath(args.dir))
    if args.id not in st["minions"]:
        raise SandboxError(f"no minion {args.id!r}; have {st['minion_ids']}")
    rest = strip_dashdash(args.rest)
    argv = [bin_path(st, "salt-call"), "-c", st["minions"][args.id]["config_dir"],
            "--out=json"] + rest
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=daemon_env(st))
    sys.stdout.write(r.stdout)
    return r.returncode


# A wheel job through Salt's own client, in the venv's python.
WHEEL_RUNNER = """\
import json, sys
import salt.config, salt.wheel

opts = salt.config.master_config(sys.argv[1])
client = salt.wheel.WheelClient(opts)
try:
    ret = client.cmd(sys.argv[2], arg=sys.argv[3:], print_event=False, full_return=True)
finally:
    getattr(client, "destroy", lambda: None)()
json.dump(ret, sys.stdout, default=str)
"""


def cmd_wheel(args):
    st = load_state(os.path.abspath(args.dir))
    rest = strip_dashdash(args.rest)
    if not rest:
        raise SandboxError("wheel: no function given")
    argv = [bin_path(st, "python"), "-c", WHEEL_RUNNER,
            os.path.join(st["config_dir"], "master")] + rest
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=daemon_env(st))
    sys.stdout.write(r.stdout)
    return r.returncode


def main(argv=None):
    ap = argparse.ArgumentParser(prog="salt-sandbox.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, fn, with_id=False, with_timeout=False, with_rest=False):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--venv", default=None)
        if with_id:
            p.add_argument("--id", required=True)
        if with_timeout:
            p.add_argument("--timeout", type=float, default=90.0)
        if with_rest:
            p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
        return p

    p = add("up", cmd_up, with_timeout=True)
    p.add_argument("--minions", type=int, default=2)
    p.add_argument("--no-minions", action="store_true",
                   help="the master alone (same as --minions 0): for benchmarks that "
                        "push events into its bus themselves")
    p.add_argument("--ipc-mode", choices=["ipc", "tcp"], default="ipc")
    p.add_argument("--master-opt", action="append", metavar="KEY=VALUE",
                   help="extra/overriding master config (VALUE as JSON if it parses); "
                        "repeatable, e.g. --master-opt master_job_cache=pgjsonb")
    p.add_argument("--minion-opt", action="append", metavar="KEY=VALUE",
                   help="extra/overriding minion config, same form")
    p.add_argument("--prefix", default="minion",
                   help="minion ids are PREFIX-1, PREFIX-2, ... (distinct ids when sandboxes "
                        "share a MoM)")
    p.add_argument("--syndic-of", metavar="MOM_DIR", default=None,
                   help="make this master a syndic node of the sandbox at MOM_DIR (started "
                        "with order_masters=true): writes etc/minion for salt-syndic, starts it "
                        "and waits until the MoM's test.ping reaches this sandbox's minions")
    p.add_argument("--interface", default="127.0.0.1",
                   help="the master's address (127.0.0.2 for a multi-master peer)")
    p.add_argument("--peer", metavar="PEER_DIR", default=None,
                   help="hot/hot multi-master: this sandbox's minions also connect to the "
                        "master of the sandbox at PEER_DIR (up first, on another --interface, "
                        "with --minions 0); this master takes the peer's key pair")
    p.add_argument("--master-d", action="store_true",
                   help="write the --master-opt options to etc/master.d/sandbox.conf "
                        "(read through Salt's default_include) instead of etc/master")
    add("down", cmd_down)
    add("status", cmd_status)
    add("stop-master", cmd_stop_master)
    add("start-master", cmd_start_master, with_timeout=True)
    add("stop-minion", cmd_stop_minion, with_id=True)
    add("start-minion", cmd_start_minion, with_id=True, with_timeout=True)
    p = add("salt", cmd_salt, with_rest=True)
    p.add_argument("--async", dest="async_", action="store_true",
                   help="run with --async and print {\"jid\": ...}")
    p.add_argument("--raw", action="store_true", help="print salt's JSON stdout unchanged")
    p.add_argument("--no-jid", action="store_true",
                   help="print salt's JSON (the --show-jid line removed)")
    add("salt-run", cmd_salt_run, with_rest=True)
    add("salt-call", cmd_salt_call, with_id=True, with_rest=True)
    add("wheel", cmd_wheel, with_rest=True)

    args = ap.parse_args(argv)
    try:
        rc = args.fn(args)
    except SandboxError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
