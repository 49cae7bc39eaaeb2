"""Record codecs: JSON (orjson) and msgpack, with the codec detected from the bytes.

A record is a mapping, so a body is either a JSON object (first non-blank byte
``{``) or a msgpack map (first byte a fixmap, map16 or map32 marker). That is
enough to tell them apart without any header, so a JSON body posted with curl
to nsqd's ``/pub`` is accepted on a topic whose codec is msgpack, and the
reverse.
"""
from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import orjson

from pipeline.errors import DecodeError
from pipeline.records.envelope import ext_hook

CODECS = ("json", "msgpack")

_BLANK = b" \t\r\n"
MSGPACK_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
# orjson turns integers beyond the unsigned 64-bit range, or below the signed
# one, into floats. A body with a run of 20+ digits, or a minus sign and 19
# digits, may hold one, so it is decoded by the exact (slower) standard library
# instead; the rest (a 19-digit ns timestamp included) take the fast path. Mapping every digit
# to "9" and looking for twenty of them is ~3x cheaper than a regex search.
DIGITS_TO_9 = bytes.maketrans(b"0123456789", b"9" * 10)
TWENTY_DIGITS = b"9" * 20
NEGATIVE_NINETEEN_DIGITS = b"-" + b"9" * 19


def beyond_orjson(body: bytes) -> bool:
    """Whether JSON ``body`` may hold an integer orjson would read as a float (decode it with ``json``)."""
    nines = body.translate(DIGITS_TO_9)
    return TWENTY_DIGITS in nines or NEGATIVE_NINETEEN_DIGITS in nines



def _msgpack_default(value: Any) -> Any:
    raise TypeError(f"cannot encode {type(value).__name__} as msgpack")


def encode_json(record: dict) -> bytes:
    """Encode ``record`` as a JSON object (numpy scalars are converted)."""
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_msgpack(record: dict) -> bytes:
    """Encode ``record`` as a msgpack map."""
    try:
        pack = _packers.pack
    except AttributeError:  # one Packer per thread (msgpack.packb would build one per call)
        pack = _packers.pack = msgpack.Packer(use_bin_type=True, default=_msgpack_default).pack
    return pack(record)


_packers = threading.local()


# encode_json as a C-level callable, for map() over a batch's records
_ENCODERS: dict[str, Callable[[dict], bytes]] = {
    "json": functools.partial(orjson.dumps, option=orjson.OPT_SERIALIZE_NUMPY), "msgpack": encode_msgpack}


def encoder(codec: str) -> Callable[[dict], bytes]:
    """Return the encode function of ``codec`` (``json`` or ``msgpack``)."""
    try:
        return _ENCODERS[codec]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}") from None


def encode(record: dict, codec: str = "json") -> bytes:
    """Encode one record with ``codec``."""
    return encoder(codec)(record)


def detect(body: bytes) -> str | None:
    """Return ``"json"`` or ``"msgpack"`` for a body that looks like a record, else None."""
    if not body:
        return None
    first = body[0]
    if first in MSGPACK_MAP_MARKERS:
        return "msgpack"
    stripped = body.lstrip(_BLANK)
    if stripped[:1] == b"{":
        return "json"
    return None


def decode(body: bytes) -> dict:
    """Decode a record, detecting its codec from the bytes.

    Raises:
        DecodeError: the body is empty, not a JSON object or msgpack map, or
            malformed; ``error.body`` is the raw body.
    """
    # detect() inlined: this runs once per message on the hot path
    first = body[0] if body else -1
    codec = "msgpack" if first in MSGPACK_MAP_MARKERS else "json" if first == 0x7B else detect(body)
    if codec is None:
        raise DecodeError(_undetected_reason(body), body)
    try:
        if codec == "json":  # an integer orjson cannot hold: the exact decoder (see beyond_orjson)
            record = json.loads(body) if beyond_orjson(body) else orjson.loads(body)
        else:
            record = msgpack.unpackb(body, raw=False, ext_hook=ext_hook)  # typed envelope columns: arrays
    except RecursionError as e:  # the exact (stdlib) JSON path recurses once per nesting level
        raise DecodeError(f"invalid {codec}: nested too deeply", body) from e
    except (ValueError, msgpack.UnpackException) as e:
        raise DecodeError(f"invalid {codec}: {e or type(e).__name__}", body) from e
    if not isinstance(record, dict):
        raise DecodeError(f"invalid {codec}: not a mapping", body)
    return record


def _undetected_reason(body: bytes) -> str:
    if not body:
        return "empty body"
    return f"not a JSON object or msgpack map (starts with {body[:16]!r})"
