"""How documents cross a process boundary: msgpack, optionally signed, never pickle.

bluesky's 0MQ ``Publisher`` / ``RemoteDispatcher`` pickle documents by default, so
anything that can publish to the proxy can run code in every subscriber. This module
is the codec ``live-bgsub serve`` and the RunEngine side use instead.

A message's payload (what follows ``prefix b" " name b" "`` on the 0MQ socket) is::

    b"LBGS\\x01" + b"U" + body                      unsigned
    b"LBGS\\x01" + b"S" + HMAC-SHA256(key, b"LBGS\\x01S" + body) + body    signed

``body`` is ``msgpack([name, doc])``: the document name is inside the signed bytes
(a signed event cannot be replayed as a start), and the name outside must match it.
numpy arrays travel as msgpack extension 1 (``[dtype.str, shape, raw bytes]``, C
order) and numpy scalars as extension 2 (``[dtype.str, raw bytes]``); object and
structured dtypes are refused. Decoding gives numpy arrays (writable) and numpy
scalars back (``numpy.float64`` too); tuples come back as lists and other subclasses
of the plain types as the plain type (as with JSON).

Anything else is refused with :class:`WireError` (``reason`` one of
:data:`REJECT_REASONS`): a pickle, garbage, an unsigned message where a key is
configured, a bad signature, a name that does not match. The decoder never calls
anything chosen by the message.

The key is a shared secret (at least 16 bytes): :func:`load_key` reads it from a file
(``live-bgsub serve --key-file``) or from ``$LIVE_BGSUB_ZMQ_KEY``. The RunEngine side
publishes with :func:`make_publisher`. See ``docs/remote.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

import msgpack
import numpy as np

__all__ = [
    "KEY_ENV",
    "MIN_KEY_BYTES",
    "REJECT_REASONS",
    "WireError",
    "as_key",
    "decode",
    "encode",
    "load_key",
    "make_publisher",
]

#: Environment variable holding the shared key (text) when no key file is given.
KEY_ENV = "LIVE_BGSUB_ZMQ_KEY"
#: Shortest key accepted, in bytes.
MIN_KEY_BYTES = 16
#: The ``reason`` of a :class:`WireError`.
REJECT_REASONS = ("pickle", "foreign", "malformed", "unsigned", "bad signature", "name mismatch")

MAGIC = b"LBGS\x01"
_UNSIGNED, _SIGNED = b"U", b"S"
_MAC_BYTES = hashlib.sha256().digest_size
_EXT_ARRAY, _EXT_SCALAR = 1, 2
# Plain dtypes only: byte order, kind, item size, optional datetime unit.
_DTYPE = re.compile(r"[<>|=][biufcmMSUV][0-9]{1,6}(\[[0-9]*[a-zA-Z]{1,3}\])?\Z")


class WireError(ValueError):
    """A payload that is not a (valid, correctly signed) live-bgsub wire message.

    ``reason`` is one of :data:`REJECT_REASONS`.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------- keys


def as_key(key) -> bytes | None:
    """``key`` (bytes, str or None) as bytes; refuses keys shorter than 16 bytes."""
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"a key is bytes or str, got {type(key).__name__}")
    key = bytes(key)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the 0MQ key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def load_key(path=None, *, env: str = KEY_ENV) -> bytes | None:
    """The shared key: the contents of ``path`` (surrounding whitespace stripped), else
    ``$LIVE_BGSUB_ZMQ_KEY``, else None (unsigned messages).

    Generate one with ``python -c "import secrets; print(secrets.token_hex(32))" > key``
    and keep the file readable only by the accounts that publish and serve.
    """
    if path is not None:
        data = Path(path).read_bytes().strip()
        if not data:
            raise ValueError(f"the key file {path} is empty")
        return as_key(data)
    value = os.environ.get(env)
    return as_key(value.strip()) if value and value.strip() else None


# ---------------------------------------------------------------------- encoding


def _default(obj):
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return msgpack.ExtType(_EXT_ARRAY, msgpack.packb([obj.dtype.str, list(obj.shape), obj.tobytes(order="C")]))
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return msgpack.ExtType(_EXT_SCALAR, msgpack.packb([obj.dtype.str, obj.tobytes()]))
    # strict_types: subclasses come here (numpy.float64 above, tuples, OrderedDicts...)
    if isinstance(obj, (tuple, list)):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    for plain in (bool, int, float, str, bytes):
        if isinstance(obj, plain):
            return plain(obj)
    raise TypeError(f"cannot put a {type(obj).__module__}.{type(obj).__qualname__} on the wire (documents hold JSON-like values and numpy arrays)")


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"cannot put a numpy array of dtype {dtype} on the wire (object or structured)")


def encode(name: str, doc: dict, key=None) -> bytes:
    """The payload for document ``name``: msgpack, signed with ``key`` when given."""
    body = msgpack.packb([name, doc], default=_default, use_bin_type=True, strict_types=True)
    key = as_key(key)
    if key is None:
        return MAGIC + _UNSIGNED + body
    mac = hmac.new(key, MAGIC + _SIGNED + body, hashlib.sha256).digest()
    return MAGIC + _SIGNED + mac + body


# ---------------------------------------------------------------------- decoding


def _ext_hook(code: int, data: bytes):
    if code == _EXT_ARRAY:
        dtype_str, shape, raw = msgpack.unpackb(data, use_list=True, raw=False)
        dtype = _dtype(dtype_str)
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ValueError(f"bad array shape {shape!r}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not isinstance(raw, bytes) or count * dtype.itemsize != len(raw):
            raise ValueError(f"array of shape {shape} and dtype {dtype} does not fit {len(raw)} bytes")
        return np.frombuffer(bytearray(raw), dtype=dtype).reshape(tuple(shape))
    if code == _EXT_SCALAR:
        dtype_str, raw = msgpack.unpackb(data, use_list=True, raw=False)
        dtype = _dtype(dtype_str)
        if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
            raise ValueError(f"a {dtype} scalar does not fit {len(raw)} bytes")
        return np.frombuffer(raw, dtype=dtype)[0]
    raise ValueError(f"unknown msgpack extension type {code}")


def _dtype(text) -> np.dtype:
    if not (isinstance(text, str) and _DTYPE.match(text)):
        raise ValueError(f"refused dtype {text!r}")
    dtype = np.dtype(text)
    _check_dtype(dtype)
    return dtype


def decode(payload: bytes, key=None, *, name=None) -> tuple[str, dict]:
    """``(name, doc)`` from a payload made by :func:`encode`.

    With ``key`` the payload must be signed with it (constant-time comparison); without,
    signed and unsigned payloads are read alike (the signature is not checked). With
    ``name`` (str or bytes: the name outside the payload) it must match the one inside.

    Raises
    ------
    WireError
        Anything else: a pickle, foreign bytes, a missing or bad signature, a
        malformed body. Nothing in the payload is executed.
    """
    payload = bytes(payload)
    header = len(MAGIC) + 1
    if not payload.startswith(MAGIC) or len(payload) < header:
        if payload[-1:] == b"." and payload[:1] in (b"\x80", b"(", b"c", b"]", b"}", b"I", b"S", b"V"):
            raise WireError("pickle", "refused a pickle payload: live-bgsub never unpickles (publish with live_bgsub.wire.make_publisher)")
        raise WireError("foreign", f"not a live-bgsub wire message ({len(payload)} bytes starting {payload[:8]!r})")
    kind = payload[len(MAGIC) : header]
    key = as_key(key)
    if kind == _SIGNED:
        mac, body = payload[header : header + _MAC_BYTES], payload[header + _MAC_BYTES :]
        if len(mac) != _MAC_BYTES:
            raise WireError("malformed", "truncated signature")
        if key is not None:
            expected = hmac.new(key, MAGIC + _SIGNED + body, hashlib.sha256).digest()
            if not hmac.compare_digest(mac, expected):
                raise WireError("bad signature", "bad signature (a different key, or a tampered message)")
    elif kind == _UNSIGNED:
        if key is not None:
            raise WireError("unsigned", "unsigned message refused: a key is configured")
        body = payload[header:]
    else:
        raise WireError("malformed", f"unknown message kind {kind!r}")
    try:
        decoded = msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types on bad input
        raise WireError("malformed", f"undecodable body: {type(exc).__name__}: {exc}") from None
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[0], str) and isinstance(decoded[1], dict)):
        raise WireError("malformed", "the body is not [name, document]")
    inner, doc = decoded
    if name is not None:
        outer = name.decode(errors="replace") if isinstance(name, (bytes, bytearray)) else name
        if outer != inner:
            raise WireError("name mismatch", f"the message says {outer!r} outside and {inner!r} inside")
    return inner, doc


# ---------------------------------------------------------------------- RunEngine side

_publisher_class = None


def _never(doc):
    raise TypeError("this Publisher encodes (name, doc) itself; its serializer is not used")


def make_publisher(address, key=None, *, prefix: bytes = b""):
    """A ``bluesky.callbacks.zmq.Publisher`` that sends :func:`encode` payloads.

    Subscribe it to the RunEngine (``RE.subscribe(make_publisher("host:5577",
    key=load_key()))``). ``key`` (bytes/str, e.g. from :func:`load_key`) signs every
    message; None sends unsigned msgpack (accepted only by a ``serve`` without a key).
    Unlike bluesky's own, it does not deep-copy documents: encoding is the copy.
    """
    global _publisher_class
    if _publisher_class is None:
        from bluesky.callbacks.zmq import Publisher

        class WirePublisher(Publisher):
            """bluesky's Publisher, sending signed/unsigned msgpack (live_bgsub.wire)."""

            def __init__(self, address, *, key=None, prefix: bytes = b""):
                super().__init__(address, prefix=prefix, serializer=_never)
                self._key = as_key(key)

            @property
            def signed(self) -> bool:
                return self._key is not None

            def __call__(self, name: str, doc: dict):
                self._socket.send(b" ".join([self._prefix, name.encode(), encode(name, doc, self._key)]))

        _publisher_class = WirePublisher
    return _publisher_class(address, key=key, prefix=prefix)
