"""SPDY/3.1 and WebSocket framing, header compression and the token store."""

from __future__ import annotations

import socket
import struct
import zlib

import pytest

from virtlet.stream import spdy
from virtlet.stream.tokens import TokenStore
from virtlet.stream.websocket import FrameReader, WebSocketError, accept_key, apply_mask, encode_frame


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


def test_header_block_round_trip_across_blocks() -> None:
    tx, rx = spdy.HeaderCodec(), spdy.HeaderCodec()
    for i in range(3):  # one zlib stream per direction: later blocks depend on earlier ones
        block = tx.encode({"streamType": "data", "port": str(8000 + i), "multi": ["a", "b"]})
        assert rx.decode(block) == {"streamtype": ["data"], "port": [str(8000 + i)], "multi": ["a", "b"]}


def test_header_block_uses_the_preset_dictionary() -> None:
    block = spdy.HeaderCodec().encode({"streamtype": "error"})
    assert block[1] & 0x20  # FDICT set
    assert struct.unpack(">I", block[2:6])[0] == zlib.adler32(spdy.DICTIONARY)
    inflated = zlib.decompressobj(zdict=spdy.DICTIONARY).decompress(block)
    assert inflated == b"\x00\x00\x00\x01\x00\x00\x00\x0astreamtype\x00\x00\x00\x05error"


def test_uppercase_header_names_are_refused() -> None:
    raw = struct.pack(">I", 1) + struct.pack(">I", 4) + b"Port" + struct.pack(">I", 2) + b"22"
    with pytest.raises(spdy.SpdyError, match="lowercase"):
        spdy.parse_header_block(raw)


@pytest.mark.parametrize("frame", [
    spdy.DataFrame(stream_id=5, flags=spdy.FLAG_FIN, data=b"hello"),
    spdy.SynStream(stream_id=3, priority=2, headers={"streamtype": ["stdin"]}),
    spdy.SynReply(stream_id=3, headers={}),
    spdy.HeadersFrame(stream_id=3, flags=spdy.FLAG_FIN, headers={"x": ["1"]}),
    spdy.RstStream(stream_id=7, status=spdy.CANCEL),
    spdy.Settings(entries=[(0, 7, 65536)]),
    spdy.Ping(ping_id=9),
    spdy.GoAway(last_good_id=11, status=0),
    spdy.WindowUpdate(stream_id=1, delta=4096),
])
def test_frame_round_trip(frame: spdy.Frame) -> None:
    tx, rx = spdy.HeaderCodec(), spdy.HeaderCodec()
    wire = spdy.encode(frame, tx)
    assert spdy.decode(wire[:8], wire[8:], rx) == frame


def test_control_frame_head_layout() -> None:
    wire = spdy.encode(spdy.Ping(ping_id=1))
    assert wire == b"\x80\x03\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01"
    data = spdy.encode(spdy.DataFrame(stream_id=1, flags=spdy.FLAG_FIN, data=b"ab"))
    assert data == b"\x00\x00\x00\x01\x01\x00\x00\x02ab"


def test_other_versions_and_truncation_are_errors() -> None:
    with pytest.raises(spdy.SpdyError, match="version 2"):
        spdy.parse_head(b"\x80\x02\x00\x06\x00\x00\x00\x04")
    with pytest.raises(spdy.SpdyError):
        spdy.decode(b"\x80\x03\x00\x03\x00\x00\x00\x02", b"\x00\x01", spdy.HeaderCodec())
    with pytest.raises(spdy.SpdyError, match="inflate"):
        spdy.decode(*_split(spdy.encode(spdy.SynReply(stream_id=1, headers={}), spdy.HeaderCodec())[:12]
                            + b"garbage!"), spdy.HeaderCodec())


def _split(wire: bytes) -> tuple[bytes, bytes]:
    head = bytearray(wire[:8])
    head[5:8] = (len(wire) - 8).to_bytes(3, "big")
    return bytes(head), wire[8:]


# -- WebSocket ----------------------------------------------------------------------------------------------
def test_accept_key_from_rfc6455() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_mask_is_an_involution() -> None:
    key = b"\x01\x02\x03\x04"
    assert apply_mask(apply_mask(b"hello world", key), key) == b"hello world"


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 200000])
def test_frames_round_trip_all_length_forms(size: int) -> None:
    a, b = socket.socketpair()
    try:
        payload = bytes(i % 251 for i in range(size))
        a.sendall(encode_frame(0x2, b"\x01" + payload, mask=True))
        opcode, data = FrameReader(b, expect_masked=True).message()
        assert (opcode, data) == (0x2, b"\x01" + payload)
    finally:
        a.close()
        b.close()


def test_fragments_are_joined_and_unmasked_client_frames_refused() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(encode_frame(0x2, b"\x00ab", mask=True, fin=False) + encode_frame(0x0, b"cd", mask=True))
        assert FrameReader(b, expect_masked=True).message() == (0x2, b"\x00abcd")
        a.sendall(encode_frame(0x2, b"\x00x"))
        with pytest.raises(WebSocketError, match="masked"):
            FrameReader(b, expect_masked=True).message()
    finally:
        a.close()
        b.close()


# -- tokens -------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_is_single_use_and_kind_bound() -> None:
    store = TokenStore(ttl=60, clock=Clock())
    t = store.issue("attach", "req")
    assert store.consume(t, "attach") == "req"
    assert store.consume(t, "attach") is None
    t2 = store.issue("attach", "req")
    assert store.consume(t2, "portforward") is None  # wrong kind burns it
    assert store.consume(t2, "attach") is None


def test_token_expires() -> None:
    clock = Clock()
    store = TokenStore(ttl=60, clock=clock)
    t = store.issue("portforward", "req")
    clock.now += 60.5
    assert store.consume(t, "portforward") is None
    assert len(store) == 0


def test_too_many_pending_tokens() -> None:
    from virtlet import errors

    store = TokenStore(ttl=60, clock=Clock(), max_pending=2)
    store.issue("attach", 1)
    store.issue("attach", 2)
    with pytest.raises(errors.ResourceExhausted):
        store.issue("attach", 3)
