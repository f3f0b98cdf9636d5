"""Downloads of pretrained weights: fail fast and in one line when they cannot happen (offline, unreachable host,
no weights), instead of after minutes of a library's retries."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lpconvert.errors import LatePhaseError, one_line
from lpconvert.hub_env import check_endpoint

#: Seconds to wait when checking that a download host answers before handing the download to timm/torchvision.
PROBE_TIMEOUT_S = 5.0


def offline() -> bool:
    """Hugging Face's offline switch (``HF_HUB_OFFLINE``), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_endpoint() -> str:
    from huggingface_hub import constants

    check_endpoint()

    return constants.ENDPOINT


def hub_cached(repo_id: str, revision: str | None, needed: Sequence[Sequence[str]]) -> bool:
    """True when, for every group of alternative file names, one is in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    check_endpoint()

    return all(
        any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in group) for group in needed
    )


def torch_hub_file(url: str) -> Path:
    """Where torch.hub (used by torchvision and timm URL weights) caches ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def torch_hub_cached(url: str) -> bool:
    return torch_hub_file(url).is_file()


def download_failed(spec: str, reason: str) -> str:
    return (
        f"cannot download the pretrained weights of '{spec}' ({reason}); "
        "pass --weights PATH with a local .safetensors/.pth file, or a local model directory"
    )


def ensure_downloadable(spec: str, url: str, cached: bool) -> None:
    """Raise at once, instead of after minutes of retries, when a needed download cannot happen."""
    if cached:
        return
    if offline():
        raise LatePhaseError(download_failed(spec, "offline mode is on (HF_HUB_OFFLINE) and they are not cached"))
    parts = urllib.parse.urlparse(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        urllib.request.urlopen(urllib.request.Request(root, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the host answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise LatePhaseError(download_failed(spec, f"{parts.netloc} is unreachable: {one_line(reason)}")) from err


def describe_hub_error(err: BaseException) -> str:
    from huggingface_hub import errors

    if isinstance(err, errors.RepositoryNotFoundError):
        return "the Hub repository does not exist, or it is private or gated and no valid token was given"
    if isinstance(err, errors.RevisionNotFoundError):
        return "the requested revision does not exist"
    if isinstance(err, errors.RemoteEntryNotFoundError):
        name = str(err.response.url).rsplit("/", 1)[-1] if err.response is not None else "a file"
        return f"the repository has no {name}; it is not a timm model repository"
    if isinstance(err, errors.LocalEntryNotFoundError):
        return "the Hub is unreachable and the files are not cached"
    return one_line(err)


@contextlib.contextmanager
def force_weights_only_loads() -> Iterator[None]:
    """Make torch.load weights-only inside library code that asks for a full unpickle (torchvision downloads)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def check_timm_download(spec: str, cfg: Any) -> None:
    """Fail fast when timm has no weights for ``cfg`` or cannot download them."""
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise LatePhaseError(
            f"timm has no pretrained weights for '{spec}'; pass --weights PATH, a local directory, "
            "or disable pretrained weights to start from random initialisation"
        )
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        ensure_downloadable(spec, hub_endpoint(), hub_cached(repo_id, revision or None, [files]))
    elif cfg.url:
        ensure_downloadable(spec, cfg.url, torch_hub_cached(cfg.url))
