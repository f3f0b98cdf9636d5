"""Publish a collapsed lpconvert output directory to the Hugging Face Hub in a single commit."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from lpconvert.errors import LatePhaseError, http_client_modules, is_network_error, one_line
from lpconvert.files import MODEL_CARD_NAME, OUTPUT_FILES, PROVENANCE_NAME, WEIGHTS_NAME, sha256_file
from lpconvert.publish.model_card import REPO_ID_PLACEHOLDER
from lpconvert.publish.model_folder import OutputDir, read_output_dir
from lpconvert.publish.weights import check_tensors, read_state_dict
from lpconvert.run.ownership import MARKER
from lpconvert.train.tensorboard import MODEL_EVENTS
from lpconvert.version import lpconvert_version

__all__ = ["push", "strip_local_paths"]

logger = logging.getLogger(__name__)

#: Files that mark a late-phase (uncollapsed) checkpoint or a training checkpoint, never a publishable model.
UNCOLLAPSED_PATTERNS = ("late_phase*", "*.pt", "*.ckpt")


def push(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    allow_regression: bool = False,
    include_extra: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` (written by :func:`lpconvert.publish.model_folder.save_pretrained`, or a run directory: its
    ``model/``) to ``repo_id``; return the commit URL (the pull-request URL with ``create_pr``).

    The repository is created if needed, then ONE commit adds ``model.safetensors``, ``config.json``, ``README.md``,
    ``lpconvert.json`` and the TensorBoard event file lpconvert wrote in ``runs/`` (plus every other non-hidden file
    when ``include_extra``), so a failure leaves the repository's files unchanged. The uploaded ``lpconvert.json`` has
    its absolute local paths replaced by their base names (:func:`strip_local_paths`; one log line names the fields,
    the local file stays as it is). Refuses uncollapsed checkpoints, a model
    card whose metadata huggingface_hub cannot parse, weights with a NaN/inf value or a negative BatchNorm variance
    and, unless ``allow_regression``, models whose recorded validation
    top-1 is below the base checkpoint's. ``token`` defaults to ``HF_TOKEN`` / the stored login, ``endpoint`` to
    ``HF_ENDPOINT``.
    """
    folder = Path(folder).expanduser()
    if (folder / MARKER).is_file() and (folder / "model").is_dir():  # a run directory: its collapsed model
        folder = folder / "model"
    _refuse_uncollapsed(folder)
    output = read_output_dir(folder)
    if not output.collapsed:
        raise LatePhaseError(_uncollapsed_message(folder, f"{PROVENANCE_NAME} says it is not collapsed"))
    _check_regression(output.metrics, allow_regression)
    _verify_weights(output)
    check_tensors(read_state_dict(folder / WEIGHTS_NAME).items(), str(folder / WEIGHTS_NAME),
                  "nothing was uploaded; export the model again from a checkpoint that did not diverge")
    _check_card(folder / MODEL_CARD_NAME)

    if endpoint is None:
        from lpconvert.hub_env import check_endpoint

        check_endpoint()
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise LatePhaseError(f"invalid repository id '{repo_id}'; use NAMESPACE/NAME, e.g. alice/resnet50-lpw") from err

    contents = _upload_contents(folder, repo_id, include_extra)
    info, stripped = strip_local_paths(output.info)
    if stripped:
        contents[PROVENANCE_NAME] = (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        logger.info("%s on the Hub: local paths replaced by their base names in %s (the local file is unchanged)",
                    PROVENANCE_NAME, ", ".join(stripped))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in contents.items()]
    api = HfApi(endpoint=endpoint, token=token, library_name="lpconvert", library_version=lpconvert_version())
    architecture = output.config.get("architecture", "model")
    message = commit_message or f"Upload {architecture} with late-phase weights (lpconvert {lpconvert_version()})"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr
        )
    except Exception as err:
        mapped = _map_hub_error(err, repo_id, revision, api.endpoint)
        if mapped is None:
            raise
        raise mapped from err
    return str(info.pr_url) if create_pr and info.pr_url else str(info.commit_url)


#: An absolute local path, POSIX (``/…``, ``~/…``, not a URL's ``//``) or Windows (``C:\\…``): a whole string, a
#: quoted one (spaces allowed), or one that starts a string or follows a space, ``=``, bracket, comma or ``:`` (as in
#: ``local-dir:/home/…``).
_ABSOLUTE = r"""(?:~?/(?!/)|[A-Za-z]:\\)"""
_LOCAL_PATH = re.compile(rf"""^{_ABSOLUTE}[^\n]+$|(?<='){_ABSOLUTE}[^'\n]+(?=')|(?<="){_ABSOLUTE}[^"\n]+(?=")"""
                         rf"""|(?:^|(?<=[\s=:(\[,])){_ABSOLUTE}[^\s'",;)\]]+""")


def _base_name(match: re.Match[str]) -> str:
    path = match[0].rstrip("/\\")
    return re.split(r"[/\\]", path)[-1] or path


def strip_local_paths(info: Any, where: str = "") -> tuple[Any, list[str]]:
    """`info` (``lpconvert.json``) with every absolute local path in its strings — ``weights``, ``data``,
    ``output``, ``collapsed_from``, the ``command`` line, ``local-dir:`` specs … — replaced by its base name, and
    the names of the fields that had one (sorted, once each): what ``push`` publishes instead of this machine's
    layout."""
    if isinstance(info, dict):
        pairs = [(key, strip_local_paths(value, str(key))) for key, value in info.items()]
        return {key: value for key, (value, _) in pairs}, sorted({n for _, (_, names) in pairs for n in names})
    if isinstance(info, list):
        items = [strip_local_paths(value, where) for value in info]
        return [value for value, _ in items], sorted({n for _, names in items for n in names})
    if isinstance(info, str):
        stripped = _LOCAL_PATH.sub(_base_name, info)
        return stripped, [where or "(top level)"] if stripped != info else []
    return info, []


def _uncollapsed_message(folder: Path, why: str) -> str:
    return (
        f"{folder} holds a late-phase (uncollapsed) checkpoint ({why}); run `lpconvert collapse` first "
        "and push the directory it writes"
    )


def _refuse_uncollapsed(folder: Path) -> None:
    if not folder.is_dir():
        raise LatePhaseError(f"not an lpconvert output directory: {folder} does not exist or is not a directory")
    for pattern in UNCOLLAPSED_PATTERNS:
        found = next((p for p in folder.rglob(pattern) if p.is_file() and not _hidden(p, folder)), None)
        if found is not None:
            raise LatePhaseError(_uncollapsed_message(folder, f"found {found.relative_to(folder)}"))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _check_regression(metrics: dict[str, Any] | None, allow_regression: bool) -> None:
    metrics = metrics or {}
    final = (metrics.get("final") or {}).get("top1")
    base = (metrics.get("base") or {}).get("top1")
    if isinstance(final, (int, float)) and isinstance(base, (int, float)) and final < base and not allow_regression:
        raise LatePhaseError(
            f"validation top-1 {final} is below the base checkpoint's {base}; pass --allow-regression to publish anyway"
        )


def _verify_weights(output: OutputDir) -> None:
    recorded = ((output.info.get("files") or {}).get(WEIGHTS_NAME) or {}).get("sha256")
    if recorded is None:
        return
    if sha256_file(output.path / WEIGHTS_NAME) != recorded:
        raise LatePhaseError(
            f"{output.path / WEIGHTS_NAME} does not match the checksum in {PROVENANCE_NAME}; "
            "the file was modified or corrupted, re-export the model"
        )


def _check_card(path: Path) -> None:
    """The card's metadata as the Hub reads it (huggingface_hub's own parser, ``model-index`` included), offline."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise LatePhaseError(f"cannot read the model card metadata of {path} ({one_line(err)}); fix its YAML header "
                             "or export the model again") from err


def _upload_contents(folder: Path, repo_id: str, include_extra: bool) -> dict[str, str | bytes]:
    """Map repo path -> local path (or bytes for the model card, whose loading snippet gets the repo id)."""
    contents: dict[str, str | bytes] = {name: str(folder / name) for name in OUTPUT_FILES}
    card = (folder / MODEL_CARD_NAME).read_text(encoding="utf-8")
    contents[MODEL_CARD_NAME] = card.replace(REPO_ID_PLACEHOLDER, repo_id).encode("utf-8")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        published = name == MODEL_EVENTS or include_extra  # of the logs, only the event file lpconvert wrote
        if path.is_file() and not _hidden(path, folder) and name not in contents and published:
            contents[name] = str(path)
    return contents


def _map_hub_error(err: Exception, repo_id: str, revision: str | None, endpoint: str) -> LatePhaseError | None:
    """One-line message for a Hub failure, or None for errors that are not about the Hub."""
    from huggingface_hub import errors

    if isinstance(err, errors.OfflineModeIsEnabled):
        return LatePhaseError("cannot push while offline mode is on (HF_HUB_OFFLINE); unset it and retry")
    if isinstance(err, errors.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if isinstance(err, errors.RevisionNotFoundError):
            return LatePhaseError(
                f"revision '{revision}' does not exist in {repo_id}; create that branch first or omit --revision"
            )
        if isinstance(err, errors.RepositoryNotFoundError) and status != 401:
            return LatePhaseError(
                f"repository {repo_id} was not found at {endpoint}, or your token cannot see it; check the repo id"
            )
        if status == 401:
            return LatePhaseError(
                f"the Hub at {endpoint} rejected the credentials (401): the token is missing or invalid; "
                "pass --token with a write token, set HF_TOKEN or run `hf auth login`"
            )
        if status == 403:
            return LatePhaseError(
                f"no write permission on {repo_id} (403); use a token with write access to that namespace "
                "or push to a repository you own"
            )
        if status == 404:
            return LatePhaseError(f"repository {repo_id} or revision {revision or 'main'} was not found at {endpoint}")
        detail = one_line(err.server_message or "") if err.server_message else f"HTTP {status}"
        return LatePhaseError(
            f"the Hub at {endpoint} failed with HTTP {status} ({detail}); nothing was committed, retry later"
        )
    if _never_connected(err):
        return LatePhaseError(
            f"cannot reach the Hub at {endpoint} ({one_line(err)}); check your network or HF_ENDPOINT, "
            "nothing was committed"
        )
    if is_network_error(err):
        return LatePhaseError(
            f"the connection to the Hub at {endpoint} broke ({one_line(err)}); commits are all-or-nothing, "
            "check the repository and push again"
        )
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        return LatePhaseError(f"the Hub rejected the model card metadata ({one_line(err)}); fix README.md's header")
    return None


def _never_connected(err: Exception) -> bool:
    """True for errors raised before any byte reached the server (refused, DNS failure, connect timeout)."""
    for http in http_client_modules():
        if isinstance(err, (http.ConnectError, http.ConnectTimeout)):
            return True
    return isinstance(err, ConnectionRefusedError)
