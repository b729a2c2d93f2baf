"""Reading values nobody vouches for (etcd records, the network config): bounded, and never raising
anything but the caller's own error."""

from __future__ import annotations

import json
from typing import Any

MAX_RECORD_BYTES = 4096
"""A real record or config is a few hundred bytes; anything larger is refused before it is parsed."""
_SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """An untrusted value for a log line: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...(cut)"


def load_json_object(raw: bytes | str, what: str, error: type[Exception]) -> dict:
    """An untrusted JSON object of at most MAX_RECORD_BYTES of UTF-8, or `error` saying why.

    Deep nesting, other encodings (json.loads would guess UTF-16/32) and oversized values are
    refused here, so no caller sees RecursionError, MemoryError or UnicodeDecodeError.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if not isinstance(raw, (bytes, bytearray)):
        raise error(f"{what} is not text")
    if len(raw) > MAX_RECORD_BYTES:
        raise error(f"{what} is {len(raw)} bytes, more than the {MAX_RECORD_BYTES} a record may have")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8") from None
    except (ValueError, RecursionError, MemoryError):
        raise error(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc
