"""Channel ids on the command line and in the ``shardpool status`` table.

A channel id is 1..:data:`~shardpool.protocol.MAX_CHANNEL_ID_BYTES` bytes. An operator gives one as

* ``hex:6368616e2d31`` — hex digits (either case);
* ``text:chan-1`` — the UTF-8 bytes of the text after the prefix;
* a bare argument: **hex** when it is an even number of hex digits (``6368616e2d31``, as
  ``status --json`` and the logs show ids), **text** when it holds any character that is not a
  hex digit (``chan-1``: it cannot be hex, so it is not ambiguous). An odd number of hex digits
  (``abc``) is refused: it is a cut hex id as likely as a text id, so the message says to write
  ``hex:`` or ``text:``. A text id that is itself valid hex (``cafe``) needs ``text:cafe``.

:func:`format_channel` is the other way round: the form the status table prints, always one that
:func:`parse_channel` reads back to the same bytes and a shell passes through unquoted (the text
when the id is plain ASCII and reads back as itself, else ``text:`` + the text, else hex), whole.
"""

from __future__ import annotations

import re

from .errors import ChannelIdError
from .routing import check_channel_id

__all__ = ["CHANNEL_FORMS", "format_channel", "format_channel_hex", "parse_channel"]

CHANNEL_FORMS = (
    "hex:HEX, text:TEXT, or a bare id: hex if it is an even number of hex digits, "
    "else text"
)
"""The accepted forms, in a few words (for ``--help`` and error messages)."""

_HEX = re.compile(r"[0-9A-Fa-f]+")
# Characters a shell passes through unquoted and argparse does not take for an option.
_SAFE_TEXT = re.compile(r"[A-Za-z0-9_.,:/@%+=-]+")


def _refuse(text: str, why: str) -> ChannelIdError:
    return ChannelIdError(f"{text!r} is not a channel id: {why}; give {CHANNEL_FORMS}")


def parse_channel(text: str) -> bytes:
    """The channel id an operator typed (see the module docstring for the forms).

    Raises:
        ChannelIdError: not in an accepted form, empty, or longer than the channel id limit (the
            message names the accepted forms).
    """
    kind, sep, rest = text.partition(":")
    if sep and kind == "hex":
        if not _HEX.fullmatch(rest) or len(rest) % 2:
            raise _refuse(text, "after hex: an even number of hex digits is expected")
        cid = bytes.fromhex(rest)
    elif sep and kind == "text":
        cid = rest.encode("utf-8", "surrogateescape")
    elif _HEX.fullmatch(text):
        if len(text) % 2:
            raise _refuse(text, "an odd number of hex digits (a cut hex id, or text?)")
        cid = bytes.fromhex(text)
    else:
        cid = text.encode("utf-8", "surrogateescape")
    try:
        return check_channel_id(cid)
    except ChannelIdError as exc:  # empty or too long
        raise _refuse(text, str(exc)) from None


def format_channel(cid: bytes) -> str:
    """``cid`` as the status table prints it: whole, in a form :func:`parse_channel` reads back
    to ``cid`` and a shell passes unquoted: ``chan-1``, ``text:cafe`` or hex."""
    try:
        text = cid.decode("ascii")
    except UnicodeDecodeError:
        return cid.hex()
    if _SAFE_TEXT.fullmatch(text):
        for form in (text, f"text:{text}"):
            if not form.startswith("-") and _reads_back(form, cid):
                return form
    return cid.hex()


def format_channel_hex(hex_id: str) -> str:
    """:func:`format_channel` of an id given in hex (as snapshots carry them); anything that is
    not hex is returned as it is."""
    try:
        return format_channel(bytes.fromhex(hex_id))
    except ValueError:
        return hex_id


def _reads_back(form: str, cid: bytes) -> bool:
    try:
        return parse_channel(form) == cid
    except ChannelIdError:
        return False
