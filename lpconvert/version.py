"""lpconvert's version, read from the installed package metadata (pyproject.toml is the one source)."""

import importlib.metadata


def lpconvert_version() -> str:
    """Installed lpconvert version, or ``"unknown"`` when running from an uninstalled source tree."""
    try:
        return importlib.metadata.version("lpconvert")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
