#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus (fuzz/corpus/<target>/) from the real
bus captures in tests/fixtures: whole streams for the framer, each frame's
data map for the JSON transcoder, each body for the event view, containers of
real bodies for the pack decoder, and the example configs.

Run with the Salt virtualenv's python (it has msgpack):
    $(bash scripts/salt-venv.sh | tail -1)/bin/python scripts/fuzz-seeds.py
"""
import hashlib
import os
import pathlib
import struct

import msgpack

root = pathlib.Path(__file__).resolve().parent.parent
corpus = root / "fuzz" / "corpus"


def put(target, data):
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def frames(stream):
    """Splits a capture with the bus's one rule (map marker or length)."""
    i = 0
    while i < len(stream):
        if stream[i] in range(0x80, 0x90):
            u = msgpack.Unpacker(raw=True)
            u.feed(stream[i:])
            u.unpack()
            n = u.tell()
            yield stream[i:i + n]
            i += n
        else:
            (n,) = struct.unpack(">I", stream[i:i + 4])
            yield stream[i + 4:i + 4 + n]
            i += 4 + n


bodies = []
for cap in sorted((root / "tests" / "fixtures").glob("*.bin")):
    stream = cap.read_bytes()
    for split in (1, 7, 64, 255):
        put("framer", bytes([split]) + stream[:4096])
    for f in frames(stream):
        put("framer", bytes([200]) + f)
        m = msgpack.unpackb(f, raw=True)
        body = m[b"body"]
        bodies.append(body)
        put("event", body)
        put("json", body.split(b"\n\n", 1)[1])

for k in range(0, len(bodies), 5):
    entries = [[b"m".decode(), 1764676800000 + k, b] for b in bodies[k:k + 5]]
    put("pack", msgpack.packb(entries, use_bin_type=True))

# What the json target once found (CI, stop 26): a map used as a key holds
# a password and a list nested to just past the depth limit counted from
# the event's top, not from the key's.
put("json", b"\x81\x82\xa8password\xa1x\xa1d" + b"\x91" * 253 + b"\x01\xa1v")
# And what it found next: a password before a part nested too deep (the
# transcode stops at the password, the redactor gives up further on).
put("json", b"\x82\xa8password\xa1x\xa1d" + b"\x91" * 300 + b"\x01")

for cfg in sorted((root / "examples").glob("*.toml")):
    put("config", cfg.read_bytes())
put("config", b"SALTPIPE_SINK_URL=postgres://u:pw@db:99999/x\n[sink]\nkeep = \"30d\"\n")
print("seeds:", {t.name: len(list(t.iterdir())) for t in corpus.iterdir()})
