"""JSON via CPython's `_json` accelerator without importing `json` (which pulls in `re`).

The plugin is started once per pod operation, so every millisecond of import
time counts against the Go reference; `json` + `re` cost several. Falls back
to `json` where `_json` is missing (other interpreters).
"""

try:
    import _json
except ImportError:  # pragma: no cover - non-CPython
    _json = None


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class _Context:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)
    memo = None


_WS = " \t\n\r"

if _json is not None:
    _scan = _json.make_scanner(_Context())
    _encode = _json.make_encoder(
        None, None, _json.encode_basestring_ascii, None, ": ", ", ", False, False, False
    )


def loads(text: str):
    """Parse one JSON document; raise ValueError (never anything else) when invalid."""
    if _json is None:  # pragma: no cover
        import json

        try:
            return json.loads(text)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc
    end = len(text)
    i = 0
    while i < end and text[i] in _WS:
        i += 1
    try:
        obj, i = _scan(text, i)
    except StopIteration as exc:
        raise ValueError(f"expecting a JSON value at char {exc.value}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError:
        raise
    except Exception:
        # `_json` reports syntax errors through `json.decoder`, found only when
        # already imported; the error path may pay for the import.
        import json

        try:
            json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        raise ValueError("invalid JSON") from None  # pragma: no cover - json accepted it
    while i < end and text[i] in _WS:
        i += 1
    if i != end:
        raise ValueError(f"extra data after the JSON value at char {i}")
    return obj


def dumps(obj) -> str:
    if _json is None:  # pragma: no cover
        import json

        return json.dumps(obj)
    return "".join(_encode(obj, 0))
