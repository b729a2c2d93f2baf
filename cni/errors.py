"""CNI error codes (spec 1.0/1.1 plus ours >= 100), the one exception the plugin raises, and how it quotes input."""

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_LIMITED = 51
# Plugin-specific codes (the spec reserves >= 100 for plugins).
EXHAUSTED = 100
DUPLICATE_ALLOCATION = 101
ADDRESS_UNAVAILABLE = 102
KERNEL = 103
CHECK_MISMATCH = 104
INTERNAL = 999  # what Go plugins report for an unexpected error


class CniError(Exception):
    """A failure reported to the runtime as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


def shown(value, limit: int = 48) -> str:
    """A runtime-supplied value for an error message: its repr, cut to `limit` characters.

    Only values the runtime handed us (env, network config) are ever shown, and
    only this short: the message ends up in pod events and logs. Content of a
    file the plugin reads is never shown at all.
    """
    try:
        text = repr(value)
    except RecursionError:  # a deeply nested config value
        text = f"<nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
