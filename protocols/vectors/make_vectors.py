#!/usr/bin/env python3
"""Regenerate the wire-v1 golden vectors: ``python protocols/vectors/make_vectors.py``.

The frames are built here with a tiny hand-written msgpack encoder that follows the spec
(protocols/wire-v1.md), NOT with hintpipe's codec, so the committed ``.bin`` files are an
independent reference the codec is tested against. ``--check`` verifies the committed files
instead of writing them. Standard library only (``msgpack`` is used, if present, merely to
cross-check the hand encoder).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CMD = 0x80000001
PAGE_COUNT = 262144  # 1 GiB guest in 4 KiB pages


# ---- minimal canonical msgpack (shortest forms), enough for v1 ------------------------------


def mp(v) -> bytes:
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v <= 0x7F:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if v >= 0:
            for fmt, tag, lim in (("B", 0xCC, 0xFF), (">H", 0xCD, 0xFFFF), (">I", 0xCE, 0xFFFFFFFF), (">Q", 0xCF, 2**64 - 1)):
                if v <= lim:
                    return bytes([tag]) + struct.pack(fmt, v)
        for fmt, tag, lim in (("b", 0xD0, 2**7), (">h", 0xD1, 2**15), (">i", 0xD2, 2**31), (">q", 0xD3, 2**63)):
            if v >= -lim:
                return bytes([tag]) + struct.pack(fmt, v)
        raise ValueError(v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        n = len(b)
        if n < 32:
            return bytes([0xA0 | n]) + b
        if n <= 0xFF:
            return b"\xd9" + bytes([n]) + b
        if n <= 0xFFFF:
            return b"\xda" + struct.pack(">H", n) + b
        return b"\xdb" + struct.pack(">I", n) + b
    if isinstance(v, (bytes, bytearray)):
        n = len(v)
        if n <= 0xFF:
            return b"\xc4" + bytes([n]) + bytes(v)
        if n <= 0xFFFF:
            return b"\xc5" + struct.pack(">H", n) + bytes(v)
        return b"\xc6" + struct.pack(">I", n) + bytes(v)
    if isinstance(v, list):
        n = len(v)
        head = bytes([0x90 | n]) if n < 16 else (b"\xdc" + struct.pack(">H", n) if n <= 0xFFFF else b"\xdd" + struct.pack(">I", n))
        return head + b"".join(mp(x) for x in v)
    if isinstance(v, dict):
        n = len(v)
        head = bytes([0x80 | n]) if n < 16 else (b"\xde" + struct.pack(">H", n) if n <= 0xFFFF else b"\xdf" + struct.pack(">I", n))
        return head + b"".join(mp(k) + mp(x) for k, x in v.items())
    raise TypeError(type(v))


def u64s(values) -> bytes:
    return b"".join(struct.pack("<Q", x) for x in values)


def ranges_bin(pairs) -> bytes:
    return u64s([x for p in pairs for x in p])


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


# ---- the vectors ---------------------------------------------------------------------------

HOST_ROUND = {"context": "host_round", "page_count": PAGE_COUNT, "cmd_id": CMD, "max_ranges": 32, "window": 4}
KEEPALIVE = 0x1  # feature bit 0 (wire-v1 section 9.1)
HOST_ROUND_KEEPALIVE = {**HOST_ROUND, "features": KEEPALIVE}

VALID = [
    ("hello.bin", "Hello", [1, 1, 4096, PAGE_COUNT, 256, 0, "guest-0"], {"version": 1, "page_size": 4096, "page_count": PAGE_COUNT, "window": 256, "features": 0, "name": "guest-0"}),
    ("welcome.bin", "Welcome", [2, 1, 32, 64, 0], {"version": 1, "max_ranges": 32, "window": 64, "features": 0}),
    ("start_round.bin", "StartRound", [3, CMD], {"cmd_id": CMD}),
    ("stop_round.bin", "StopRound", [4, CMD], {"cmd_id": CMD}),
    ("hints.bin", "Hints", None, {"cmd_id": CMD, "ranges": [[0, 512], [1024, 512], [4096, 1], [8194, 2]]}),
    ("hints_max_order.bin", "Hints", None, {"cmd_id": CMD, "ranges": [[1 << 20, 1 << 20]]}),
    ("round_end.bin", "RoundEnd", [6, CMD, 3], {"cmd_id": CMD, "batches": 3}),
    ("ack.bin", "Ack", [7, 1], {"count": 1}),
    ("fault.bin", "Fault", None, {"seq": 7, "pfns": [5, 70000, PAGE_COUNT - 1]}),
    ("fault_done.bin", "FaultDone", [9, 7], {"seq": 7}),
    (
        "done.bin",
        "Done",
        None,
        {"ok": True, "summary": {"pages_sent": 1234, "skip_efficiency": 0.97, "rounds": [1, 2], "note": "ok", "lost_pages": 0, "extra": None}},
    ),
    ("error.bin", "Error", [11, 7, "range 0 unaligned"], {"code": 7, "message": "range 0 unaligned"}),
    ("bye.bin", "Bye", [12, "migration complete"], {"reason": "migration complete"}),
    ("hello_keepalive.bin", "Hello", [1, 1, 4096, PAGE_COUNT, 256, KEEPALIVE, "guest-0"], {"version": 1, "page_size": 4096, "page_count": PAGE_COUNT, "window": 256, "features": KEEPALIVE, "name": "guest-0"}),
    ("welcome_keepalive.bin", "Welcome", [2, 1, 32, 64, KEEPALIVE], {"version": 1, "max_ranges": 32, "window": 64, "features": KEEPALIVE}),
    ("ping.bin", "Ping", [13, 0], {"seq": 0}),
    ("pong.bin", "Pong", [14, 0xFFFFFFFF], {"seq": 0xFFFFFFFF}),
]


def valid_payload(name, fields, obj):
    if obj is not None:
        return mp(obj)
    if name == "Hints":
        return mp([5, fields["cmd_id"], ranges_bin(fields["ranges"])])
    if name == "Fault":
        return mp([8, fields["seq"], u64s(fields["pfns"])])
    if name == "Done":
        return mp([10, fields["ok"], fields["summary"]])
    raise KeyError(name)


DECODER = {"context": "decoder"}
# (file, frame bytes, expected error, context, description)
INVALID = [
    ("bad_truncated.bin", frame(mp([7, 1]))[:-1], "MALFORMED_FRAME", {"context": "decoder_eof"}, "stream ends one byte before the frame does"),
    ("bad_oversized_length.bin", struct.pack("<I", (1 << 20) + 1), "FRAME_TOO_LARGE", DECODER, "length prefix 1 MiB + 1, no payload follows"),
    ("bad_empty_payload.bin", struct.pack("<I", 0), "MALFORMED_FRAME", DECODER, "zero-length payload"),
    ("bad_not_array.bin", frame(mp({"type": 7})), "MALFORMED_FRAME", DECODER, "payload is a map, not an array"),
    ("bad_trailing_bytes.bin", frame(mp([7, 1]) + b"\xc0"), "MALFORMED_FRAME", DECODER, "a nil after the array inside the frame"),
    ("bad_invalid_msgpack.bin", frame(b"\xc1"), "MALFORMED_FRAME", DECODER, "0xc1 is never used in msgpack"),
    ("bad_unknown_type.bin", frame(mp([99, 1])), "UNKNOWN_MESSAGE", DECODER, "message type 99"),
    ("bad_version.bin", frame(mp([1, 2, 4096, PAGE_COUNT, 256, 0, "g", "future-field"])), "BAD_VERSION", DECODER, "Hello version 2 (with an extra field)"),
    ("bad_page_size.bin", frame(mp([1, 1, 65536, PAGE_COUNT, 256, 0, "g"])), "UNSUPPORTED", DECODER, "Hello page_size 65536"),
    ("bad_field_type_bool.bin", frame(mp([7, True])), "BAD_FIELD", DECODER, "Ack count is a boolean"),
    ("bad_field_type_str.bin", frame(mp([3, "0x80000001"])), "BAD_FIELD", DECODER, "StartRound cmd_id is a string"),
    ("bad_field_count.bin", frame(mp([7, 1, 2])), "BAD_FIELD", DECODER, "Ack with two fields"),
    ("bad_ranges_bin_len.bin", frame(mp([5, CMD, b"\x00" * 15])), "BAD_FIELD", DECODER, "ranges bin of 15 bytes"),
    ("bad_ranges_as_list.bin", frame(mp([5, CMD, [0, 1]])), "BAD_FIELD", DECODER, "ranges as an array instead of a bin"),
    ("bad_unaligned.bin", frame(mp([5, CMD, ranges_bin([[0, 512], [1280, 512]])])), "RANGE_UNALIGNED", HOST_ROUND, "start 1280 is not a multiple of npages 512"),
    ("bad_not_pow2.bin", frame(mp([5, CMD, ranges_bin([[0, 3]])])), "RANGE_UNALIGNED", HOST_ROUND, "npages 3"),
    ("bad_zero_npages.bin", frame(mp([5, CMD, ranges_bin([[8, 0]])])), "RANGE_UNALIGNED", HOST_ROUND, "npages 0"),
    ("bad_order_too_big.bin", frame(mp([5, CMD, ranges_bin([[0, 1 << 21]])])), "RANGE_UNALIGNED", HOST_ROUND, "npages 2**21 > 2**MAX_RANGE_ORDER"),
    ("bad_overlap.bin", frame(mp([5, CMD, ranges_bin([[0, 512], [2048, 1], [256, 256]])])), "RANGE_OVERLAP", HOST_ROUND, "[256, 256] lies inside [0, 512]"),
    ("bad_out_of_bounds.bin", frame(mp([5, CMD, ranges_bin([[0, 1], [PAGE_COUNT, 512]])])), "RANGE_OUT_OF_BOUNDS", HOST_ROUND, "[262144, 512] with page_count 262144"),
    ("bad_batch_too_large.bin", frame(mp([5, CMD, ranges_bin([[i, 1] for i in range(33)])])), "BATCH_TOO_LARGE", HOST_ROUND, "33 ranges, max_ranges 32"),
    ("bad_unknown_cmd_id.bin", frame(mp([5, CMD + 1, ranges_bin([[0, 1]])])), "UNKNOWN_COMMAND_ID", HOST_ROUND, "Hints under an id the host never issued"),
    ("bad_ping_seq.bin", frame(mp([13, 2**32])), "BAD_FIELD", DECODER, "Ping seq 2**32 is not a u32"),
    ("bad_ping_not_agreed.bin", frame(mp([13, 0])), "UNEXPECTED_MESSAGE", HOST_ROUND, "Ping on a connection without KEEPALIVE"),
    ("bad_ping_twice.bin", frame(mp([13, 0])) + frame(mp([13, 1])), "CREDIT_EXCEEDED", HOST_ROUND_KEEPALIVE, "a second Ping before the first was answered"),
    ("bad_pong_unsolicited.bin", frame(mp([14, 0])), "UNEXPECTED_MESSAGE", HOST_ROUND_KEEPALIVE, "Pong while the host has no Ping outstanding"),
]


def build() -> tuple[dict[str, bytes], list[dict]]:
    files: dict[str, bytes] = {}
    index: list[dict] = []
    for fname, name, obj, fields in VALID:
        data = frame(valid_payload(name, fields, obj))
        files[fname] = data
        index.append({"file": fname, "type": name, "fields": fields, "sha256": hashlib.sha256(data).hexdigest()})
    for fname, data, code, ctx, desc in INVALID:
        files[fname] = data
        index.append({"file": fname, "error": code, **ctx, "description": desc, "sha256": hashlib.sha256(data).hexdigest()})
    return files, index


def _crosscheck(files) -> None:
    try:
        import msgpack
    except ImportError:
        return
    for fname, data in files.items():
        if fname.startswith("bad_"):
            continue
        payload = data[4:]
        assert msgpack.packb(msgpack.unpackb(payload, raw=False), use_bin_type=True) == payload, fname


def main(argv: list[str]) -> int:
    files, index = build()
    _crosscheck(files)
    text = json.dumps({"version": 1, "vectors": index}, indent=1) + "\n"
    if "--check" in argv:
        bad = [f for f, d in files.items() if (HERE / f).read_bytes() != d]
        if (HERE / "index.json").read_text() != text:
            bad.append("index.json")
        print("mismatch: " + ", ".join(bad) if bad else "all vectors match")
        return 1 if bad else 0
    for f, d in files.items():
        (HERE / f).write_bytes(d)
    (HERE / "index.json").write_text(text)
    print(f"wrote {len(files)} vectors to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
