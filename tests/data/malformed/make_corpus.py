#!/usr/bin/env python3
"""Rebuild the corpus of malformed wire-v1 input: ``python tests/data/malformed/make_corpus.py``.

Each case is a byte stream (one or more frames) with the error a v1 receiver must report for it
and the *context* it is received in (``index.json``):

- ``decoder``: fed to a bare frame decoder (then end of stream);
- ``host_fresh``: a host connection waiting for Hello;
- ``host_round``: a host that received ``Hello(page_count=262144, window=4, features=KEEPALIVE)``,
  answered ``Welcome(max_ranges=32, features=KEEPALIVE)`` and sent ``StartRound(0x80000000)``;
- ``guest_fresh``: a guest that sent ``Hello(page_count=262144, window=4, features=KEEPALIVE)``;
- ``guest_ready``: that guest after ``Welcome(max_ranges=32, window=4, features=KEEPALIVE)``.

Frames before the bad one are valid in their context. The cases cover every field at and past its
limit, msgpack size limits, and valid messages in orders the state machines refuse; fuzzing
(tests/test_protocol_fuzz.py) adds random ones. Frames are built with ``msgpack`` directly, not
with hintpipe's codec. ``--check`` compares the committed files instead of writing them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent
CMD = 0x80000000
PAGES = 262144
KA = 1  # FEATURE_KEEPALIVE


def frame(obj) -> bytes:
    payload = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(payload)) + payload


def rng(*pairs) -> bytes:
    return b"".join(struct.pack("<QQ", s, n) for s, n in pairs)


def pfns(*values) -> bytes:
    return b"".join(struct.pack("<Q", v) for v in values)


HELLO = [1, 1, 4096, PAGES, 4, KA, "g"]
CASES: list[tuple[str, bytes, str, str, str]] = []  # name, data, error, context, description


def case(name, data, error, context, description):
    CASES.append((name, data, error, context, description))


# ---- fields at and past their limits (decoder) -----------------------------------------------
D = "decoder"
case("hello_page_count_zero", frame([1, 1, 4096, 0, 4, 0, "g"]), "BAD_FIELD", D, "page_count 0")
case("hello_page_count_past", frame([1, 1, 4096, 2**40 + 1, 4, 0, "g"]), "BAD_FIELD", D, "page_count 2**40 + 1")
case("hello_window_zero", frame([1, 1, 4096, PAGES, 0, 0, "g"]), "BAD_FIELD", D, "window 0")
case("hello_window_past", frame([1, 1, 4096, PAGES, 4097, 0, "g"]), "BAD_FIELD", D, "window 4097")
case("hello_features_past", frame([1, 1, 4096, PAGES, 4, 2**32, "g"]), "BAD_FIELD", D, "features 2**32")
case("hello_name_past", frame([1, 1, 4096, PAGES, 4, 0, "n" * 65]), "BAD_FIELD", D, "name of 65 characters")
case("hello_name_bin", frame([1, 1, 4096, PAGES, 4, 0, b"g"]), "BAD_FIELD", D, "name as bin")
case("hello_version_past", frame([1, 2**32, 4096, PAGES, 4, 0, "g"]), "BAD_FIELD", D, "version 2**32")
case("hello_version_2_short", frame([1, 2]), "BAD_VERSION", D, "a version-2 Hello with no other field")
case("hello_page_size", frame([1, 1, 8192, PAGES, 4, 0, "g"]), "UNSUPPORTED", D, "page_size 8192")
case("hello_short", frame([1, 1, 4096, PAGES, 4, 0]), "BAD_FIELD", D, "Hello without name")
case("welcome_max_ranges_zero", frame([2, 1, 0, 4, 0]), "BAD_FIELD", D, "max_ranges 0")
case("welcome_max_ranges_past", frame([2, 1, 4097, 4, 0]), "BAD_FIELD", D, "max_ranges 4097")
case("welcome_window_past", frame([2, 1, 32, 4097, 0]), "BAD_FIELD", D, "window 4097")
case("start_round_negative", frame([3, -1]), "BAD_FIELD", D, "cmd_id -1")
case("start_round_past", frame([3, 2**32]), "BAD_FIELD", D, "cmd_id 2**32")
case("stop_round_float", frame([4, 1.0]), "BAD_FIELD", D, "cmd_id 1.0")
case("hints_empty", frame([5, CMD, b""]), "BAD_FIELD", D, "no range")
case("hints_bin_len", frame([5, CMD, b"\0" * 24]), "BAD_FIELD", D, "24-byte ranges bin")
case("hints_past", frame([5, CMD, b"\0" * 16 * 4097]), "BATCH_TOO_LARGE", D, "4097 ranges")
case("hints_cmd_past", frame([5, 2**32, rng((0, 1))]), "BAD_FIELD", D, "cmd_id 2**32")
case("round_end_batches_past", frame([6, CMD, 2**32]), "BAD_FIELD", D, "batches 2**32")
case("ack_zero", frame([7, 0]), "BAD_FIELD", D, "count 0")
case("ack_past", frame([7, 4097]), "BAD_FIELD", D, "count 4097")
case("ack_nil", frame([7, None]), "BAD_FIELD", D, "count nil")
case("fault_empty", frame([8, 1, b""]), "BAD_FIELD", D, "no pfn")
case("fault_bin_len", frame([8, 1, b"\0" * 12]), "BAD_FIELD", D, "12-byte pfns bin")
case("fault_seq_past", frame([8, 2**32, pfns(0)]), "BAD_FIELD", D, "seq 2**32")
case("fault_done_str", frame([9, "1"]), "BAD_FIELD", D, "seq as str")
case("done_ok_int", frame([10, 1, {}]), "BAD_FIELD", D, "ok as int")
case("done_summary_depth_past", frame([10, True, {"a": [[[[[[[[1]]]]]]]]}]), "BAD_FIELD", D, "summary nested 9 deep")
case("done_summary_nan", frame([10, True, {"a": float("inf")}]), "BAD_FIELD", D, "summary inf")
case("done_summary_bin", frame([10, True, {"a": b"x"}]), "BAD_FIELD", D, "summary bin value")
case("error_message_past", frame([11, 1, "e" * 4097]), "BAD_FIELD", D, "message of 4097 characters")
case("error_code_past", frame([11, 2**32, "e"]), "BAD_FIELD", D, "code 2**32")
case("bye_reason_past", frame([12, "b" * 4097]), "BAD_FIELD", D, "reason of 4097 characters")
case("ping_bool", frame([13, True]), "BAD_FIELD", D, "seq true")
case("pong_two_fields", frame([14, 1, 2]), "BAD_FIELD", D, "Pong with two fields")
case("type_past", frame([15, 0]), "UNKNOWN_MESSAGE", D, "type 15")
case("type_huge", frame([2**64 - 1]), "UNKNOWN_MESSAGE", D, "type 2**64 - 1")
case("type_negative", frame([-(2**63)]), "UNKNOWN_MESSAGE", D, "type -2**63")
case("type_str", frame(["Ack", 1]), "MALFORMED_FRAME", D, "type as str")
case("empty_array", frame([]), "MALFORMED_FRAME", D, "empty array")
case("map_payload", frame({"t": 7}), "MALFORMED_FRAME", D, "a map")
case("nil_payload", frame(None), "MALFORMED_FRAME", D, "nil")
case("array_past", frame(b"\xdd\x00\x01\x00\x01" + b"\x07" * 65537), "MALFORMED_FRAME", D, "array of 65537 elements")
case("map_past", frame([10, True, {f"k{i}": i for i in range(1025)}]), "MALFORMED_FRAME", D, "summary map of 1025 entries")
case("str_past", frame([12, "\u00e9" * 8193]), "MALFORMED_FRAME", D, "str of 16386 bytes")
case("ext", frame(b"\x92\x07\xd4\x01\x00"), "MALFORMED_FRAME", D, "ext type")
case("never_used_byte", frame(b"\x92\x07\xc1"), "MALFORMED_FRAME", D, "0xc1")
case("bad_utf8", frame(b"\x92\x0c\xa2\xff\xfe"), "MALFORMED_FRAME", D, "invalid UTF-8 in a str")
case("trailing", frame(msgpack.packb([7, 1]) + b"\x00"), "MALFORMED_FRAME", D, "a byte after the value")
case("truncated_value", frame(b"\x92\x07"), "MALFORMED_FRAME", D, "array of 2 with one element")
case("length_past", struct.pack("<I", (1 << 20) + 1), "FRAME_TOO_LARGE", D, "length prefix 1 MiB + 1")
case("length_max", struct.pack("<I", 0xFFFFFFFF), "FRAME_TOO_LARGE", D, "length prefix 2**32 - 1")
case("length_zero", struct.pack("<I", 0), "MALFORMED_FRAME", D, "length prefix 0")
case("eof_in_prefix", b"\x03\x00", "MALFORMED_FRAME", D, "stream ends inside the length prefix")
case("eof_in_payload", frame([7, 1])[:-1], "MALFORMED_FRAME", D, "stream ends inside the payload")

# ---- valid messages in orders the host refuses ----------------------------------------------
HF, HR = "host_fresh", "host_round"
for name, obj in (("hints", [5, CMD, rng((0, 1))]), ("round_end", [6, CMD, 0]), ("fault", [8, 1, pfns(0)]),
                  ("ping", [13, 0]), ("pong", [14, 0]), ("welcome", [2, 1, 32, 4, 0]), ("ack", [7, 1]),
                  ("start_round", [3, CMD]), ("done", [10, True, {}])):
    case(f"host_first_{name}", frame(obj), "UNEXPECTED_MESSAGE", HF, f"{name} before Hello")
case("host_hello_twice", frame(HELLO), "UNEXPECTED_MESSAGE", HR, "a second Hello")
case("host_after_bye", frame([12, "bye"]) + frame([13, 0]), "UNEXPECTED_MESSAGE", HR, "a Ping after the guest's Bye")
case("host_credit", b"".join(frame([5, CMD, rng((i, 1))]) for i in range(5)), "CREDIT_EXCEEDED", HR,
     "5 un-acked Hints with window 4")
case("host_round_end_batches", frame([5, CMD, rng((0, 1))]) + frame([6, CMD, 2]), "BAD_FIELD", HR,
     "RoundEnd counts 2 batches, the host received 1")
case("host_round_end_unknown", frame([6, CMD + 1, 0]), "UNKNOWN_COMMAND_ID", HR, "RoundEnd for a round never started")
case("host_hints_after_round_end", frame([6, CMD, 0]) + frame([5, CMD, rng((0, 1))]), "UNKNOWN_COMMAND_ID", HR,
     "Hints under a round whose RoundEnd came")
case("host_round_end_twice", frame([6, CMD, 0]) + frame([6, CMD, 0]), "UNKNOWN_COMMAND_ID", HR, "two RoundEnds")
case("host_hints_below_base", frame([5, 1, rng((0, 1))]), "UNKNOWN_COMMAND_ID", HR, "Hints under cmd_id 1")
case("host_hints_past_max_ranges", frame([5, CMD, rng(*((i, 1) for i in range(33)))]), "BATCH_TOO_LARGE", HR,
     "33 ranges, max_ranges 32")
case("host_hints_past_guest", frame([5, CMD, rng((PAGES - 512, 1024))]), "RANGE_UNALIGNED", HR,
     "[261632, 1024]: start not a multiple of npages")
case("host_hints_end_past", frame([5, CMD, rng((PAGES, 1))]), "RANGE_OUT_OF_BOUNDS", HR, "range starts at page_count")
case("host_hints_at_end", frame([5, CMD, rng((PAGES - 1, 1))]) + frame([5, CMD, rng((PAGES - 1, 2))]),
     "RANGE_UNALIGNED", HR, "the last page is fine; [262143, 2] is not aligned")
case("host_hints_wrap", frame([5, CMD, rng((2**64 - 2**20, 2**20))]), "RANGE_OUT_OF_BOUNDS", HR,
     "a range whose end wraps around 2**64")
case("host_hints_overlap_unsorted", frame([5, CMD, rng((1024, 512), (0, 2048))]), "RANGE_OVERLAP", HR,
     "[0, 2048] covers [1024, 512]")
case("host_hints_duplicate", frame([5, CMD, rng((8, 1), (8, 1))]), "RANGE_OVERLAP", HR, "one range twice")
case("host_fault_past", frame([8, 1, pfns(PAGES)]), "RANGE_OUT_OF_BOUNDS", HR, "pfn page_count")
case("host_fault_seq_twice", frame([8, 1, pfns(0)]) + frame([8, 1, pfns(1)]), "BAD_FIELD", HR,
     "a Fault seq still outstanding")
case("host_faults_past", b"".join(frame([8, i, pfns(i)]) for i in range(65)), "CREDIT_EXCEEDED", HR,
     "65 outstanding Faults")
case("host_ping_twice", frame([13, 0]) + frame([13, 1]), "CREDIT_EXCEEDED", HR, "a second Ping before the Pong")
case("host_pong_unasked", frame([14, 0]), "UNEXPECTED_MESSAGE", HR, "a Pong for no Ping")
case("host_gets_start_round", frame([3, CMD + 1]), "UNEXPECTED_MESSAGE", HR, "StartRound sent to a host")
case("host_gets_done", frame([10, True, {}]), "UNEXPECTED_MESSAGE", HR, "Done sent to a host")

# ---- valid messages in orders the guest refuses ---------------------------------------------
GF, GR = "guest_fresh", "guest_ready"
case("guest_welcome_window", frame([2, 1, 32, 5, KA]), "BAD_FIELD", GF, "window 5 > the 4 asked for")
case("guest_welcome_features", frame([2, 1, 32, 4, 2]), "BAD_FIELD", GF, "a feature the guest did not offer")
case("guest_start_before_welcome", frame([3, CMD]), "UNEXPECTED_MESSAGE", GF, "StartRound before Welcome")
case("guest_ping_before_welcome", frame([13, 0]), "UNEXPECTED_MESSAGE", GF, "Ping before Welcome")
case("guest_welcome_twice", frame([2, 1, 32, 4, KA]), "UNEXPECTED_MESSAGE", GR, "a second Welcome")
case("guest_start_below_base", frame([3, 5]), "BAD_FIELD", GR, "StartRound cmd_id 5")
case("guest_start_not_above", frame([3, CMD + 2]) + frame([4, CMD + 2]) + frame([3, CMD + 1]), "BAD_FIELD", GR,
     "StartRound id not above the previous")
case("guest_start_while_active", frame([3, CMD]) + frame([3, CMD + 1]), "UNEXPECTED_MESSAGE", GR,
     "StartRound while a round is active")
case("guest_open_rounds_past", b"".join(frame([3, CMD + i]) + frame([4, CMD + i]) for i in range(16)) + frame([3, CMD + 16]),
     "UNEXPECTED_MESSAGE", GR, "a 17th round without RoundEnd")
case("guest_stop_unknown", frame([3, CMD]) + frame([4, CMD + 1]), "UNKNOWN_COMMAND_ID", GR, "StopRound for an id never started")
case("guest_stop_twice", frame([3, CMD]) + frame([4, CMD]) + frame([4, CMD]), "UNEXPECTED_MESSAGE", GR, "StopRound twice")
case("guest_ack_past", frame([7, 1]), "BAD_FIELD", GR, "an Ack with no Hints in flight")
case("guest_fault_done_unknown", frame([9, 3]), "UNEXPECTED_MESSAGE", GR, "FaultDone for no Fault")
case("guest_after_done", frame([10, True, {}]) + frame([3, CMD]), "UNEXPECTED_MESSAGE", GR, "StartRound after Done")
case("guest_after_error", frame([11, 14, "x"]) + frame([7, 1]), "UNEXPECTED_MESSAGE", GR, "an Ack after the host's Error")
case("guest_gets_hello", frame(HELLO), "UNEXPECTED_MESSAGE", GR, "Hello sent to a guest")
case("guest_gets_hints", frame([5, CMD, rng((0, 1))]), "UNEXPECTED_MESSAGE", GR, "Hints sent to a guest")
case("guest_pong_unasked", frame([14, 7]), "UNEXPECTED_MESSAGE", GR, "a Pong for no Ping")


def build() -> tuple[dict[str, bytes], list[dict]]:
    files, index = {}, []
    for name, data, error, context, description in CASES:
        fname = f"{name}.bin"
        assert fname not in files, fname
        files[fname] = data
        index.append({"file": fname, "error": error, "context": context, "description": description,
                      "sha256": hashlib.sha256(data).hexdigest()})
    return files, index


def main(argv: list[str]) -> int:
    files, index = build()
    text = json.dumps({"cases": index}, indent=1) + "\n"
    if "--check" in argv:
        bad = [f for f, d in files.items() if not (HERE / f).exists() or (HERE / f).read_bytes() != d]
        if (HERE / "index.json").read_text() != text:
            bad.append("index.json")
        print("mismatch: " + ", ".join(bad) if bad else "corpus matches")
        return 1 if bad else 0
    for old in HERE.glob("*.bin"):
        old.unlink()
    for f, d in files.items():
        (HERE / f).write_bytes(d)
    (HERE / "index.json").write_text(text)
    print(f"wrote {len(files)} cases to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
