"""The wire codec (live_bgsub.wire): msgpack documents with numpy, signed or not, never pickle."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from live_bgsub.wire import MAGIC, WireError, as_key, decode, encode

KEY = b"k" * 32


def _doc():
    return {
        "uid": "e1",
        "seq_num": 3,
        "time": 1.5,
        "filled": {},
        "data": {
            "frame": np.arange(12, dtype="<i4").reshape(3, 4),
            "big_endian": np.arange(5, dtype=">f8"),
            "strided": np.arange(24, dtype=np.uint16).reshape(4, 6)[::2, 1::2],
            "fortran": np.asfortranarray(np.linspace(0, 1, 6).reshape(2, 3)),
            "empty": np.zeros((0, 7), dtype=np.float32),
            "zero_d": np.array(2.5),
            "complex": np.array([1 + 2j], dtype=np.complex64),
            "strings": np.array(["ab", "c"]),
            "stamps": np.array(["2024-01-01T00:00"], dtype="datetime64[ms]"),
            "flag": np.bool_(True),
            "f32": np.float32(0.25),
            "i64": np.int64(-7),
            "u8": np.uint8(255),
        },
        "nested": {"a": [1, "two", None, {"b": [np.float64(3.0), b"\x00raw"]}], "c": True},
        "tuple": (1, 2.0),
    }


def _same(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert type(b) is type(a) and b == a
    else:
        assert type(b) is type(a) and b == a


@pytest.mark.parametrize("key", [None, KEY])
def test_documents_round_trip(key):
    doc = _doc()
    name, back = decode(encode("event", doc, key), key, name=b"event")
    assert name == "event"
    _same(doc, back)
    assert back["data"]["frame"].flags.writeable  # as a pickled array would be
    assert back["data"]["strided"].flags.c_contiguous


def test_a_pickle_is_refused_without_being_run(tmp_path):
    marker = tmp_path / "marker"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(WireError, match="refused a pickle payload: live-bgsub never unpickles") as info:
            decode(pickle.dumps(Exploit(), protocol=protocol))
        assert info.value.reason == "pickle"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "reason", "match"),
    [
        (b"", "foreign", "not a live-bgsub wire message"),
        (b"hello world", "foreign", "not a live-bgsub wire message"),
        (MAGIC + b"X" + b"body", "malformed", "unknown message kind"),
        (MAGIC + b"U" + b"\xc1", "malformed", "undecodable body"),
        (MAGIC + b"U" + msgpack.packb({"not": "a pair"}), "malformed", r"not \[name, document\]"),
        (MAGIC + b"S" + b"short", "malformed", "truncated signature"),
        # An array extension whose bytes do not fit its shape, one with an object dtype.
        (MAGIC + b"U" + msgpack.packb(["event", {"a": msgpack.ExtType(1, msgpack.packb(["<f8", [4], b"\0" * 8]))}]), "malformed", "does not fit"),
        (MAGIC + b"U" + msgpack.packb(["event", {"a": msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\0" * 8]))}]), "malformed", "refused dtype"),
        (MAGIC + b"U" + msgpack.packb(["event", {"a": msgpack.ExtType(9, b"")}]), "malformed", "unknown msgpack extension"),
    ],
)
def test_foreign_and_malformed_payloads_are_refused(payload, reason, match):
    with pytest.raises(WireError, match=match) as info:
        decode(payload)
    assert info.value.reason == reason


def test_signatures():
    payload = encode("start", {"uid": "s"}, KEY)
    assert decode(payload, KEY) == ("start", {"uid": "s"})
    assert decode(payload) == ("start", {"uid": "s"})  # no key here: read, not verified
    for what, bad, reason in [
        ("another key", (payload, b"x" * 32), "bad signature"),
        ("one flipped bit", (payload[:-1] + bytes([payload[-1] ^ 1]), KEY), "bad signature"),
        ("unsigned", (encode("start", {"uid": "s"}), KEY), "unsigned"),
    ]:
        with pytest.raises(WireError) as info:
            decode(*bad)
        assert info.value.reason == reason, what
    # The name is signed: the name outside must be the one inside.
    with pytest.raises(WireError, match="'stop' outside and 'start' inside") as info:
        decode(payload, KEY, name=b"stop")
    assert info.value.reason == "name mismatch"


def test_what_cannot_be_encoded_and_short_keys():
    with pytest.raises(TypeError, match="dtype object"):
        encode("event", {"a": np.array([object()])})
    with pytest.raises(TypeError, match="structured"):
        encode("event", {"a": np.zeros(2, dtype=[("x", "<i4")])})
    with pytest.raises(TypeError, match="cannot put a builtins.object on the wire"):
        encode("event", {"a": object()})
    with pytest.raises(ValueError, match="at least 16 bytes"):
        as_key("short")
    assert as_key("s" * 16) == b"s" * 16 and as_key(None) is None
