"""Golden vectors (protocols/vectors): committed bytes decode to the listed fields and
re-encode byte for byte; invalid vectors fail with the listed error code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hintpipe.protocol import (
    ErrorCode,
    MessageType,
    FrameDecoder,
    Hello,
    HostConnection,
    ProtocolError,
    decode,
    encode,
)

VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())["vectors"]
VALID = [v for v in INDEX if "type" in v]
INVALID = [v for v in INDEX if "error" in v]


def _bytes(entry) -> bytes:
    return (VECTORS / entry["file"]).read_bytes()


def _as_plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def test_index_is_complete_and_files_are_the_committed_ones():
    # Every message type has a vector, and the bytes on disk are the ones the index was
    # written for (the test never regenerates them).
    assert {v["type"] for v in VALID} == {t.name.title().replace("_", "") for t in MessageType}
    assert len(INVALID) >= 8
    for entry in INDEX:
        assert hashlib.sha256(_bytes(entry)).hexdigest() == entry["sha256"], entry["file"]


def test_hand_checked_bytes():
    # Spelled out from the spec, independent of the generator script.
    assert (VECTORS / "ack.bin").read_bytes() == bytes.fromhex("03000000" "92" "07" "01")
    assert (VECTORS / "start_round.bin").read_bytes() == bytes.fromhex("07000000" "92" "03" "ce80000001")
    assert (VECTORS / "ping.bin").read_bytes() == bytes.fromhex("03000000" "92" "0d" "00")
    assert (VECTORS / "pong.bin").read_bytes() == bytes.fromhex("07000000" "92" "0e" "ceffffffff")
    assert (VECTORS / "welcome_keepalive.bin").read_bytes() == bytes.fromhex("06000000" "95" "02" "01" "20" "40" "01")
    hints = (VECTORS / "hints.bin").read_bytes()
    assert hints[:13] == bytes.fromhex("49000000" "93" "05" "ce80000001" "c440")
    assert hints[13:29] == (0).to_bytes(8, "little") + (512).to_bytes(8, "little")


@pytest.mark.parametrize("entry", VALID, ids=lambda v: v["file"])
def test_valid_vector_roundtrip(entry):
    data = _bytes(entry)
    msg = decode(data)
    assert type(msg).__name__ == entry["type"]
    fields = {k: _as_plain(getattr(msg, k)) for k in entry["fields"]}
    assert fields == entry["fields"]
    assert encode(msg) == data


@pytest.mark.parametrize("entry", VALID, ids=lambda v: v["file"])
def test_valid_vector_one_byte_at_a_time(entry):
    data = _bytes(entry)
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        m = dec.next_message()
        if m is not None:
            out.append((i, m))
    assert len(out) == 1 and out[0][0] == len(data) - 1
    assert encode(out[0][1]) == data


def _host_in_round(entry) -> HostConnection:
    host = HostConnection()
    features = entry.get("features", 0)
    host.receive_data(encode(Hello(1, 4096, entry["page_count"], entry["window"], features, "t")))
    assert isinstance(host.next_event(), Hello)
    host.welcome(max_ranges=entry["max_ranges"], features=features)
    assert host.features == features
    host.start_round(entry["cmd_id"])
    return host


@pytest.mark.parametrize("entry", INVALID, ids=lambda v: v["file"])
def test_invalid_vector(entry):
    data = _bytes(entry)
    code = ErrorCode[entry["error"]]
    ctx = entry["context"]
    if ctx == "host_round":
        host = _host_in_round(entry)
        host.receive_data(data)
        with pytest.raises(ProtocolError) as ei:
            for _ in range(8):  # the frames before the bad one are valid events
                host.next_event()
        assert host.state.name == "ERROR"
    else:
        dec = FrameDecoder()
        dec.feed(data)
        with pytest.raises(ProtocolError) as ei:
            if dec.next_message() is not None:
                pytest.fail("invalid vector decoded")
            assert ctx == "decoder_eof"
            dec.eof()
    assert ei.value.code is code, str(ei.value)
