#!/usr/bin/env python3
"""Record the raw byte stream of a Salt master's event bus to a file.

Stdlib only. Connects as a subscriber (sends nothing) and appends every byte
received to OUT, unbuffered, until SIGTERM/SIGINT, --duration seconds, or EOF.

    capture-bus.py --socket /path/master_event_pub.ipc --out FILE [--duration S]
    capture-bus.py --tcp 127.0.0.1:4512 --out FILE [--duration S]
    capture-bus.py --sandbox DIR --out FILE      (reads DIR/sandbox.json)

--ready-file F: touch F once connected (so a driver can wait for it).
Prints {"bytes": N, "seconds": T, "eof": bool} on stdout when done.
"""
import argparse
import json
import os
import signal
import socket
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--socket")
    g.add_argument("--tcp", help="HOST:PORT")
    g.add_argument("--sandbox", help="salt-sandbox directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--ready-file", default=None)
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    a = ap.parse_args()

    if a.sandbox:
        with open(os.path.join(a.sandbox, "sandbox.json")) as f:
            st = json.load(f)
        if st.get("ipc_mode") == "tcp":
            a.tcp = f"127.0.0.1:{st['tcp_pub']}"
        else:
            a.socket = st["event_pub"]

    stop = {"flag": False}

    def on_sig(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_sig)
    signal.signal(signal.SIGINT, on_sig)

    deadline = time.monotonic() + a.connect_timeout
    while True:
        try:
            if a.tcp:
                host, port = a.tcp.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=2)
            else:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(a.socket)
            break
        except OSError as e:
            if time.monotonic() > deadline or stop["flag"]:
                print(f"capture-bus: cannot connect: {e}", file=sys.stderr)
                sys.exit(1)
            time.sleep(0.2)
    s.settimeout(0.2)
    if a.ready_file:
        open(a.ready_file, "w").close()
    t0 = time.monotonic()
    total = 0
    eof = False
    with open(a.out, "ab", buffering=0) as out:
        while not stop["flag"]:
            if a.duration is not None and time.monotonic() - t0 >= a.duration:
                break
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            if not chunk:
                eof = True
                break
            out.write(chunk)
            total += len(chunk)
        # drain what is already queued without blocking
        if not eof:
            s.setblocking(False)
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out.write(chunk)
                    total += len(chunk)
            except (BlockingIOError, OSError):
                pass
    s.close()
    print(json.dumps({"bytes": total, "seconds": round(time.monotonic() - t0, 3), "eof": eof}))


if __name__ == "__main__":
    main()
