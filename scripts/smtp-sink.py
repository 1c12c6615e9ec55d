#!/usr/bin/env python3
"""A real SMTP server on loopback that stores what it receives, for tests.

    smtp-sink.py --dir D [--user U --password P] [--tls starttls|tls --cert C --key K]

Listens on 127.0.0.1 on a free port (aiosmtpd), prints {"port": N} on one
stdout line once it accepts connections, writes each message it accepts to
D/<n>.eml (envelope sender and recipients in D/<n>.json), and with --user
refuses mail until the client has authenticated (AUTH PLAIN/LOGIN, allowed
without TLS: loopback only). With --tls starttls it requires STARTTLS
before anything else; with --tls tls it speaks TLS from the first byte.
Stops when stdin closes or on SIGTERM.
"""
import argparse, json, os, signal, socket, sys, threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--tls", choices=["starttls", "tls"])
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    lock = threading.Lock()
    count = [0]

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            if a.user and not session.authenticated:
                return "530 5.7.0 Authentication required"
            with lock:
                count[0] += 1
                n = count[0]
            base = os.path.join(a.dir, str(n))
            with open(base + ".json.tmp", "w") as f:
                json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos}, f)
            with open(base + ".eml.tmp", "wb") as f:
                f.write(envelope.original_content or envelope.content)
            os.rename(base + ".json.tmp", base + ".json")
            os.rename(base + ".eml.tmp", base + ".eml")
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login.decode() == a.user
              and auth_data.password.decode() == a.password)
        return AuthResult(success=ok, handled=False)

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    kw = {}
    if a.user:
        kw = dict(authenticator=authenticator, auth_require_tls=False)
    if a.tls:
        import ssl
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.cert, a.key)
        if a.tls == "starttls":
            kw.update(tls_context=ctx, require_starttls=True)
        else:
            kw.update(ssl_context=ctx)
    c = Controller(Handler(), hostname="127.0.0.1", port=port, **kw)
    c.start()
    print(json.dumps({"port": port}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    c.stop()


if __name__ == "__main__":
    main()
