#!/usr/bin/env python3
"""Decode a raw Salt event-bus capture: one line per frame, tag then data as JSON.

    dump-bus.py FILE [--tags-only] [--offsets]

Needs msgpack: run it with a Salt venv's python, e.g.
    $(scripts/salt-venv.sh)/bin/python scripts/dump-bus.py tests/fixtures/salt-3008.5-bus.bin

Framing (both handled, per frame): a frame whose first byte is a msgpack map
marker (0x80-0x8f, 0xde, 0xdf) is one bare msgpack map (3007, 3008, 3006.0-25);
otherwise it is a 4-byte big-endian length followed by that many bytes of
msgpack (3006.26+). The map is {"head": {...}, "body": <bin or str>}; body is
"<tag>\\n\\n<msgpack data>". Ext type 78 (datetime) is shown as
{"$datetime": "..."}; bytes that are not UTF-8 as {"$bin": "<hex>"}.
"""
import argparse
import json
import struct
import sys

import msgpack


def ext_hook(code, data):
    if code == 78:
        return {"$datetime": data.decode("utf-8", "replace")}
    return {"$ext": code, "hex": data.hex()}


def jsonable(o):
    if isinstance(o, bytes):
        try:
            return {"$bytes": o.decode("utf-8")}
        except UnicodeDecodeError:
            return {"$bin": o.hex()}
    if isinstance(o, dict):
        return {(k if isinstance(k, str) else json.dumps(jsonable(k))): jsonable(v)
                for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(x) for x in o]
    return o


def unpack_one(buf):
    """Unpack exactly one msgpack object from the start of buf; return (obj, used)."""
    u = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=ext_hook,
                         max_buffer_size=len(buf) + 16)
    u.feed(buf)
    obj = u.unpack()
    return obj, u.tell()


def frames(data):
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
            obj, used = unpack_one(data[i:])
            yield i, "bare", obj
            i += used
        else:
            if i + 4 > n:
                raise ValueError(f"truncated length prefix at offset {i}")
            (ln,) = struct.unpack(">I", data[i:i + 4])
            if i + 4 + ln > n:
                raise ValueError(f"truncated frame at offset {i} (len {ln})")
            obj, used = unpack_one(data[i + 4:i + 4 + ln])
            if used != ln:
                raise ValueError(f"frame at {i}: length {ln} but msgpack used {used}")
            yield i, "len32", obj
            i += 4 + ln


def split_body(body):
    if isinstance(body, str):
        body = body.encode("utf-8")
    tag, sep, rest = body.partition(b"\n\n")
    if not sep:
        return tag.decode("utf-8", "replace"), None
    data = msgpack.unpackb(rest, raw=False, strict_map_key=False, ext_hook=ext_hook)
    return tag.decode("utf-8", "replace"), data


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--tags-only", action="store_true")
    ap.add_argument("--offsets", action="store_true", help="prefix offset and framing")
    a = ap.parse_args()
    with open(a.file, "rb") as f:
        data = f.read()
    count = 0
    for off, kind, obj in frames(data):
        count += 1
        if not isinstance(obj, dict) or "body" not in obj:
            line = "<non-event frame> " + json.dumps(jsonable(obj))
        else:
            tag, payload = split_body(obj["body"])
            extra_head = obj.get("head") or {}
            if a.tags_only:
                line = tag
            else:
                line = tag + "\t" + json.dumps(jsonable(payload), sort_keys=True)
                if extra_head:
                    line += "\thead=" + json.dumps(jsonable(extra_head), sort_keys=True)
        if a.offsets:
            line = f"{off}\t{kind}\t{line}"
        print(line)
    print(f"# {count} frames, {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
