"""torch and torchvision must be a matching pair, or ``import lpconvert`` ends in one line that says so.

torchvision's compiled operators are built against one torch release: torchvision 0.(m + 15) goes with torch 2.m
(torch 2.14.1 ↔ torchvision 0.29.1). A pair that does not match fails inside ``import torchvision`` — typically
``RuntimeError: operator torchvision::nms does not exist`` at the end of a 40-line traceback — or half-works.
:func:`check_torch_pair` turns both into :class:`TorchPairError`, an ``ImportError`` whose message is one line naming
both versions and the command that installs a matching pair. It reads the versions from the installed packages'
metadata first, so a pair that cannot match is refused before torch is imported; this module itself imports nothing
heavy. The check runs when this module is imported, second thing in ``lpconvert/__init__.py``.
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

#: For torch 2.x, torchvision's minor version is torch's + 15 (torch 2.14 ↔ torchvision 0.29).
TORCHVISION_MINOR_OFFSET = 15

#: Where the PyTorch wheels of one build (the local version: ``+cpu``, ``+cu130``, ``+rocm6.4`` …) are published.
WHEEL_INDEX = "https://download.pytorch.org/whl/"


class TorchPairError(ImportError):
    """torch and torchvision do not pair; the message is one line naming both versions and the fix."""


def installed_version(name: str) -> str | None:
    """The installed version of torch or torchvision without importing it: the package's own ``version.py``
    (``2.14.1+cu130``: with the build, which the metadata of a wheel from PyPI lacks) when it agrees with the
    metadata, else the metadata's; None when neither is there."""
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = None
    try:
        spec = importlib.util.find_spec(name)
        text = Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except (ImportError, ValueError, OSError):
        text = ""
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match and (version is None or match[1].partition("+")[0] == version.partition("+")[0]):
        return match[1]
    return version


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def paired_torchvision(torch_version: str) -> str | None:
    """The torchvision release series (``"0.29"``) that goes with `torch_version`, or None where the rule is unknown."""
    parsed = _major_minor(torch_version)
    if parsed is None or parsed[0] != 2:
        return None
    return f"0.{parsed[1] + TORCHVISION_MINOR_OFFSET}"


def install_command(torch_version: str, reinstall: bool = False) -> str:
    """The pip command that installs the torchvision of `torch_version` (pinning torch, which stays) from the index of
    torch's build; with `reinstall`, torchvision alone is replaced even where its version already pairs."""
    series = paired_torchvision(torch_version)
    release, _, build = torch_version.partition("+")
    index = f" --index-url {WHEEL_INDEX}{build}" if re.fullmatch(r"cpu|cu\d+|rocm[\d.]+|xpu", build) else ""
    torchvision = f'"torchvision=={series}.*"' if series else "torchvision"
    if reinstall:
        return f"pip install --force-reinstall --no-deps {torchvision}{index}"
    return f"pip install torch=={release} {torchvision}{index}"


def version_mismatch(torch_version: str | None, torchvision_version: str | None) -> str | None:
    """Why the installed versions cannot pair (one line with the fix), or None when they pair or are unknown."""
    if torch_version is None or torchvision_version is None:
        return None
    series = paired_torchvision(torch_version)
    found = _major_minor(torchvision_version)
    if series is None or found is None or f"{found[0]}.{found[1]}" == series:
        return None
    torch_series = ".".join(map(str, _major_minor(torch_version) or ()))
    return (f"torch {torch_version} and torchvision {torchvision_version} do not pair (torch {torch_series} needs "
            f"torchvision {series}: its minor version is torch's + {TORCHVISION_MINOR_OFFSET}); install a matching "
            f"pair: {install_command(torch_version)}")


def import_failure(torch_version: str, torchvision_version: str | None, err: BaseException) -> str:
    """The one line for an ``import torchvision`` that failed."""
    from lpconvert.errors import one_line

    if torchvision_version is None and isinstance(err, ModuleNotFoundError) and err.name == "torchvision":
        return f"torchvision is not installed (lpconvert needs it, with torch {torch_version}): " \
               f"{install_command(torch_version)}"
    return (f"torchvision {torchvision_version or '(version unknown)'} does not load with torch {torch_version} "
            f"({type(err).__name__}: {one_line(err)}): the two are not a matching build; reinstall torchvision from "
            f"torch's index: {install_command(torch_version, reinstall=True)}")


def check_torch_pair() -> None:
    """Raise :class:`TorchPairError` (one line) when torch and torchvision do not pair: by their installed versions
    before torch is imported, else when ``import torchvision`` fails. torch's own import failures are torch's."""
    torch_version, torchvision_version = installed_version("torch"), installed_version("torchvision")
    problem = version_mismatch(torch_version, torchvision_version)
    if problem is not None:
        raise TorchPairError(problem, name="lpconvert")
    import torch

    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError, OSError) as err:
        raise TorchPairError(import_failure(torch_version or torch.__version__, torchvision_version, err),
                             name="lpconvert") from err


check_torch_pair()
