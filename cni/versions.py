"""The CNI spec versions the plugin speaks, and its VERSION reply.

Its own module, importing only the JSON codec, so that VERSION (which runtimes
call before anything else) costs an interpreter start and little more: see
`cni.main`.
"""

from .jsonfast import dumps, loads

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"


def stated_version(conf) -> str:
    """The version a reply states: the config's cniVersion when we support it, else the latest."""
    version = conf.get("cniVersion") if isinstance(conf, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST_VERSION


def version_reply(stdin: bytes):
    """VERSION: (0, the spec's version JSON). A config that does not decode is ignored, never an error."""
    try:
        conf = loads(stdin.decode())
    except (UnicodeError, ValueError):
        conf = None
    return 0, dumps({"cniVersion": stated_version(conf), "supportedVersions": list(SUPPORTED_VERSIONS)})
