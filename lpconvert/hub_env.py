"""A malformed ``HF_ENDPOINT`` must not break ``import lpconvert``.

huggingface_hub parses ``HF_ENDPOINT`` when it is imported (timm imports it at import time), and a value such as
``http://[bad`` raises a ``ValueError`` traceback there. :func:`shelve_bad_endpoint` (run when this module is
imported, first thing in ``lpconvert/__init__.py``) hides such a value while huggingface_hub is imported and remembers it;
:func:`check_endpoint` then reports it in one line when the Hub is actually used, instead of silently using the
default endpoint.
"""

from __future__ import annotations

import os
import sys
import urllib.parse

from lpconvert.errors import LatePhaseError, one_line

#: The malformed HF_ENDPOINT value and why it is malformed, when one was shelved at import time.
_bad: tuple[str, str] | None = None


def _problem(value: str) -> str | None:
    """Why huggingface_hub cannot parse ``value`` as its endpoint, or None."""
    try:
        parts = urllib.parse.urlsplit(value.rstrip("/"))
        parts.hostname  # noqa: B018  (what huggingface_hub reads at import)
        parts.port  # noqa: B018  (raises on a non-numeric or out-of-range port)
    except ValueError as err:
        return one_line(err)
    return None


def shelve_bad_endpoint() -> None:
    """Import huggingface_hub with a malformed HF_ENDPOINT hidden, remembering the value for :func:`check_endpoint`."""
    global _bad
    value = os.environ.get("HF_ENDPOINT", "")
    if not value or "huggingface_hub.constants" in sys.modules:
        return
    problem = _problem(value)
    if problem is None:
        return
    _bad = (value, problem)
    del os.environ["HF_ENDPOINT"]
    try:
        import huggingface_hub.constants  # noqa: F401  (parses the endpoint once, now without the bad value)
    finally:
        os.environ["HF_ENDPOINT"] = value


def check_endpoint() -> None:
    """Raise a one-line error when the Hub is about to be used with a malformed HF_ENDPOINT."""
    if _bad is not None and os.environ.get("HF_ENDPOINT") == _bad[0]:
        value, problem = _bad
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise LatePhaseError(
            f"HF_ENDPOINT={shown!r} is not a valid URL ({problem}); set it to the Hub's address, "
            "e.g. https://huggingface.co, or unset it"
        )


shelve_bad_endpoint()
