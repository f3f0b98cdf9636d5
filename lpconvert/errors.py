"""The one exception type for user errors, and the helpers that keep error messages to one line.

Library code raises :class:`LatePhaseError` (a ``ValueError``) with a one-line message that says what is wrong and
what to do; the CLI turns it into that line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import urllib.error
from typing import Any


class LatePhaseError(ValueError):
    """A user error: bad input, a bad option or a model in the wrong state."""


def one_line(err: Any) -> str:
    """``err`` as a single line of at most 200 characters, for embedding in an error message."""
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(err).__name__)


def http_client_modules() -> list[Any]:
    """The HTTP client modules huggingface_hub may use (httpx2 or httpx), those that are installed."""
    modules = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            modules.append(__import__(name))
    return modules


def _network_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    types: list[type[BaseException]] = [
        errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
        urllib.error.URLError, ConnectionError, TimeoutError,
    ]
    types += [module.TransportError for module in http_client_modules()]
    with contextlib.suppress(ImportError):
        import requests

        types.append(requests.exceptions.RequestException)
    return tuple(types)


def is_network_error(err: BaseException) -> bool:
    """True for errors of the network or the Hub (connection, timeout, HTTP, offline mode), whichever HTTP client."""
    return isinstance(err, _network_error_types())


#: A message longer than this (e.g. one quoting a huge value) is cut: one line, readable in a terminal.
MAX_MESSAGE = 1000


def user_message(err: LatePhaseError) -> str:
    """The one-line message of a user error, also when a DataLoader worker re-raised it with the worker's
    traceback folded into the message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("LatePhaseError: ", 1)[-1]
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " … (cut)"


def os_error_message(err: OSError) -> str:
    """A file-system failure (disk full, read-only, permission denied…) in one line, naming the path."""
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    return f"cannot write or read{where}: {err.strerror or one_line(err)}; free space, fix permissions or choose another path"
