"""BOLT #1/#2 wire messages: the codec the real Lightning traffic travels in.

The message definitions are the ones Core Lightning publishes from the spec: ``pyln-bolt2``'s
extract of BOLT #2, loaded into ``pyln-proto``'s :class:`MessageNamespace`. ``pyln-proto``'s own
reader is the reference, but it is a protocol-testing tool: it reads every ``byte`` array one
element at a time into a list of ints (≈700 µs for one ``update_add_htlc`` with its 1,366-byte
onion), far slower than the signature checks the handler exists to do. So each message type's
field list is compiled here, once, into ``struct`` formats (runs of fixed-size fields become one
``unpack_from``) plus the variable-length arrays in between: ~2 µs per message, no field layout
written by hand. ``tests/test_demo_wire.py`` checks both directions byte-exactly against pyln.

Decoded messages are dicts: ``{"type": name, field: value, ...}`` with the field names of the
spec; integers are ``int``, fixed-size fields and ``byte`` arrays ``bytes``, arrays of other
fixed-size elements (``htlc_signature``) lists of ``bytes``; a length field (``num_htlcs``,
``len``) is kept as read; a trailing TLV stream is kept undecoded as ``tlvs`` bytes (``b""`` when
absent) — the state machine reads none, and BOLT #1 lets a receiver ignore unknown odd TLVs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, Final

from pyln.proto.message import (  # type: ignore[import-untyped]
    DynamicArrayType,
    SizedArrayType,
    TlvStreamType,
)
from pyln.proto.message.array_types import LengthFieldType  # type: ignore[import-untyped]
from pyln.proto.message.fundamental_types import (  # type: ignore[import-untyped]
    FundamentalHexType,
    IntegerType,
)
from pyln.spec.bolt2 import namespace as _BOLT2  # type: ignore[import-untyped]

__all__ = [
    "MESSAGE_NUMBERS",
    "WireError",
    "decode",
    "encode",
    "message_type",
    "namespace",
]

_TYPE = struct.Struct(">H")


class WireError(ValueError):
    """A message that is not a well-formed BOLT message of a known type (truncated, trailing
    garbage where no TLV stream may follow, unknown type number, a field of the wrong size)."""


def namespace() -> Any:
    """pyln's :class:`MessageNamespace` of BOLT #2 (the reference codec the tests compare with)."""
    return _BOLT2


# A compiled message is a list of steps; each reads (or writes) one or more fields.
#   ("fixed", struct, names)       consecutive fixed-size fields, one struct format
#   ("len", struct, name)          a length field: its value sizes the arrays that name it
#   ("bytes", lenname, name)       a byte array whose size is a length field's value
#   ("list", lenname, name, size)  an array of fixed-size byte-string elements (signatures)
#   ("tlvs", name)                 a trailing TLV stream, kept as raw bytes
_Step = tuple[Any, ...]


def _fixed_format(ftype: Any) -> str | None:
    """The struct format of a fixed-size field type, or None if its size varies."""
    if type(ftype) is IntegerType:
        return str(ftype.structfmt).lstrip(">")
    if isinstance(ftype, FundamentalHexType):
        return f"{ftype.bytelen}s"
    if isinstance(ftype, SizedArrayType) and type(ftype.elemtype) is IntegerType \
            and ftype.elemtype.name == "byte":
        return f"{ftype.arraysize}s"
    return None


def _compile(mtype: Any) -> list[_Step]:
    """The steps of one pyln ``MessageType``. Raises TypeError for a field kind this codec does
    not support (none of BOLT #2's messages has one)."""
    steps: list[_Step] = []
    fmt: list[str] = []
    names: list[str] = []

    def flush() -> None:
        if names:
            steps.append(("fixed", struct.Struct(">" + "".join(fmt)), tuple(names)))
            fmt.clear()
            names.clear()

    for f in mtype.fields:
        ftype = f.fieldtype
        one = _fixed_format(ftype)
        if one is not None:
            fmt.append(one)
            names.append(f.name)
            continue
        flush()
        if isinstance(ftype, LengthFieldType):
            steps.append(("len", struct.Struct(ftype.underlying_type.structfmt), f.name))
        elif isinstance(ftype, DynamicArrayType) and ftype.elemtype.name == "byte":
            steps.append(("bytes", ftype.lenfield.name, f.name))
        elif isinstance(ftype, DynamicArrayType) and isinstance(ftype.elemtype,
                                                                FundamentalHexType):
            steps.append(("list", ftype.lenfield.name, f.name, ftype.elemtype.bytelen))
        elif isinstance(ftype, TlvStreamType):
            steps.append(("tlvs", f.name))
        else:
            raise TypeError(f"{mtype.name}.{f.name}: unsupported field type {ftype!r}")
    flush()
    return steps


_BY_NAME: Final[dict[str, tuple[int, list[_Step]]]] = {
    name: (int(m.number), _compile(m)) for name, m in _BOLT2.messagetypes.items()
}
_BY_NUMBER: Final[dict[int, tuple[str, list[_Step]]]] = {
    num: (name, steps) for name, (num, steps) in _BY_NAME.items()
}
MESSAGE_NUMBERS: Final[Mapping[str, int]] = {name: num for name, (num, _) in _BY_NAME.items()}
"""BOLT #2 message type numbers by name (``update_add_htlc`` → 128, ...)."""


def message_type(data: bytes) -> str | None:
    """The type name of an encoded message (its first two bytes), None if unknown or too short.
    Never raises for bytes."""
    if len(data) < 2:
        return None
    entry = _BY_NUMBER.get(_TYPE.unpack_from(data)[0])
    return entry[0] if entry is not None else None


def decode(data: bytes) -> dict[str, Any]:
    """Parse one BOLT #2 message (type number first).

    Returns:
        ``{"type": name, **fields}``, see the module docstring.

    Raises:
        WireError: truncated, unknown type, or bytes left over where no TLV stream may follow.
    """
    if len(data) < 2:
        raise WireError(f"{len(data)} bytes: too short for a message type")
    number = _TYPE.unpack_from(data)[0]
    entry = _BY_NUMBER.get(number)
    if entry is None:
        raise WireError(f"unknown message type {number}")
    name, steps = entry
    out: dict[str, Any] = {"type": name}
    try:
        end = _read(steps, data, 2, out)
    except struct.error as e:
        raise WireError(f"{name}: truncated ({e})") from None
    if end != len(data):
        raise WireError(f"{name}: {len(data) - end} bytes after the last field")
    return out


def _read(steps: list[_Step], data: bytes, pos: int, out: dict[str, Any]) -> int:
    """Apply ``steps`` to ``data`` from ``pos``; fields go into ``out``; returns the end."""
    for step in steps:
        kind = step[0]
        if kind == "fixed":
            st: struct.Struct = step[1]
            out.update(zip(step[2], st.unpack_from(data, pos), strict=True))
            pos += st.size
        elif kind == "len":
            out[step[2]] = step[1].unpack_from(data, pos)[0]
            pos += step[1].size
        elif kind == "bytes":
            n = out[step[1]]
            if pos + n > len(data):
                raise struct.error(f"{step[2]} needs {n} bytes")
            out[step[2]] = data[pos : pos + n]
            pos += n
        elif kind == "list":
            n, size = out[step[1]], step[3]
            if pos + n * size > len(data):
                raise struct.error(f"{step[2]} needs {n * size} bytes")
            out[step[2]] = [data[p : p + size] for p in range(pos, pos + n * size, size)]
            pos += n * size
        else:  # tlvs: the rest of the message
            out[step[1]] = data[pos:]
            pos = len(data)
    return pos


def encode(name: str, fields: Mapping[str, Any]) -> bytes:
    """Encode one message of type ``name`` from ``fields`` (the spec's field names; length fields
    may be left out: they are taken from their arrays; ``tlvs`` may be left out: none).

    Raises:
        WireError: unknown type, a missing field, or a value that does not fit its field.
    """
    entry = _BY_NAME.get(name)
    if entry is None:
        raise WireError(f"unknown message type {name!r}")
    number, steps = entry
    parts = [_TYPE.pack(number)]
    try:
        _write(steps, fields, parts.append)
    except (KeyError, struct.error, TypeError) as e:
        raise WireError(f"{name}: {type(e).__name__}: {e}") from None
    return b"".join(parts)


def _write(steps: list[_Step], fields: Mapping[str, Any], put: Callable[[bytes], None]) -> None:
    lengths = _array_lengths(steps, fields)
    for step in steps:
        kind = step[0]
        if kind == "fixed":
            values = [fields[n] for n in step[2]]
            put(step[1].pack(*values))
        elif kind == "len":
            put(step[1].pack(lengths[step[2]]))
        elif kind == "bytes":
            put(bytes(fields[step[2]]))
        elif kind == "list":
            items = fields[step[2]]
            if any(len(x) != step[3] for x in items):
                raise struct.error(f"{step[2]}: every element must be {step[3]} bytes")
            put(b"".join(items))
        else:
            put(bytes(fields.get(step[1], b"")))


def _array_lengths(steps: list[_Step], fields: Mapping[str, Any]) -> dict[str, int]:
    """Each length field's value: the length of the arrays it sizes (which must agree)."""
    lengths: dict[str, int] = {}
    for step in steps:
        if step[0] in ("bytes", "list"):
            n = len(fields[step[2]])
            if lengths.setdefault(step[1], n) != n:
                raise struct.error(f"arrays sized by {step[1]} differ in length")
    return lengths


def reference_decode(data: bytes) -> dict[str, Any]:
    """Decode with pyln-proto's own reader (slow; for tests and checks): the same shape as
    :func:`decode` (byte arrays as bytes, length fields included, no ``tlvs`` when absent).

    Raises:
        ValueError: pyln refused the message.
    """
    import io

    from pyln.proto.message import Message

    msg = Message.read(_BOLT2, io.BytesIO(data))
    if msg is None:
        raise ValueError("empty message")
    out: dict[str, Any] = {"type": msg.messagetype.name}
    for f in msg.messagetype.fields:
        if isinstance(f.fieldtype, LengthFieldType):
            # pyln drops a length field once read; the value is its arrays' length.
            out[f.name] = f.fieldtype.calc_value(msg.fields)
            continue
        if f.name not in msg.fields:
            continue
        value = msg.fields[f.name]
        if isinstance(f.fieldtype, TlvStreamType) and not value:
            continue  # pyln reads an absent TLV stream as {}
        if isinstance(f.fieldtype, (SizedArrayType, DynamicArrayType)) \
                and f.fieldtype.elemtype.name == "byte":
            value = bytes(value)
        out[f.name] = value
    return out


def reference_encode(name: str, fields: Mapping[str, Any]) -> bytes:
    """Encode with pyln-proto's own writer (slow; for tests and checks). Length fields and an
    absent ``tlvs`` are left to pyln. Raises ValueError as pyln does."""
    import io

    from pyln.proto.message import Message

    mtype = _BOLT2.get_msgtype(name)
    if mtype is None:
        raise ValueError(f"unknown message type {name!r}")
    given: dict[str, Any] = {}
    for f in mtype.fields:
        if f.name not in fields or isinstance(f.fieldtype, LengthFieldType):
            continue
        value = fields[f.name]
        if isinstance(f.fieldtype, TlvStreamType):
            if value:
                raise ValueError("reference_encode: raw TLV bytes are not supported")
            continue
        if isinstance(f.fieldtype, (SizedArrayType, DynamicArrayType)) \
                and f.fieldtype.elemtype.name == "byte":
            value = list(value)
        given[f.name] = value
    buf = io.BytesIO()
    Message(mtype, **given).write(buf)
    return buf.getvalue()

