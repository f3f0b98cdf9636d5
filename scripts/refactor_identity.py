"""Before/after identity of a refactor: a fixed set of small runs whose records must not change.

Runs plain fine-tuning; the T0 switch with σ0; SWA; the accumulation control; vectorized BatchNorm + rank-1 members;
GroupNorm with options; an interrupted run resumed; and a ``compare`` of 2 arms × 2 seeds — all on scikit-learn's
digits through the CLI of the lpconvert that Python imports (``PYTHONPATH=TREE`` picks a tree) — and writes one
digest: every metrics.jsonl, report.json, lpconvert.json and model card without timings or paths, and the SHA-256 of
every saved tensor file's tensors. Two digests are compared with ``--compare A B``::

    PYTHONPATH=/path/to/old python scripts/refactor_identity.py --out /tmp/before
    python scripts/refactor_identity.py --out /tmp/after
    python scripts/refactor_identity.py --compare /tmp/before/digest.json /tmp/after/digest.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

COMMON = ["--data", "sklearn-digits", "--batch-size", "40", "--workers", "0", "--quiet", "--no-pretrained",
          "--epochs", "2", "--lr", "0.05", "--threads", "1", "--seed", "3"]
RUNS: dict[str, list[str]] = {
    "plain": ["finetune", "digits_cnn", *COMMON, "--K", "1"],
    "t0-sigma0": ["finetune", "digits_cnn", *COMMON, "--K", "3", "--t0", "1", "--sigma0", "0.2"],
    "swa": ["finetune", "digits_cnn", *COMMON, "--K", "2", "--swa-start", "1", "--swa-lr", "0.02",
            "--recalibrate-batches", "5"],
    "accumulate": ["finetune", "digits_cnn", *COMMON, "--K", "1", "--accumulate", "3"],
    "vectorized-rank1": ["finetune", "digits_cnn", *COMMON, "--K", "3", "--mode", "vectorized",
                         "--late-phase", "batchnorm,rank1"],
    "groupnorm-options": ["finetune", "digits_cnn_gn", *COMMON, "--K", "2", "--late-phase", "norm,hypernet",
                          "--late-phase-options", "hypernet.rank=2,hypernet.allow_error=true"],
}
#: An interrupted run: stopped after 7 iterations as SIGINT stops it (``run(..., stop_after=7)``).
STOP = """import sys
from lpconvert.config import FinetuneConfig
from lpconvert.train.finetune import run
try:
    run(FinetuneConfig(model="digits_cnn", data="sklearn-digits", batch_size=40, workers=0, quiet=True,
                       pretrained=False, epochs=2, lr=0.05, threads=1, seed=3, K=2, output=sys.argv[1]), stop_after=7)
except Exception as stop:
    print(type(stop).__name__)
"""
#: Keys whose values differ between any two runs of the same settings (times, paths, versions).
VOLATILE = re.compile(r"seconds|_s$|per_s|time|started|finished|created|date|path|dir|version|command|collapsed_from|"
                      r"root|threads|pid|host|eta|duration")


def lpconvert(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m lpconvert ARGS`` run in `cwd` (not in a source tree: ``-m`` would import that tree's lpconvert
    before the one PYTHONPATH names)."""
    return subprocess.run([sys.executable, "-m", "lpconvert", *args], env=env, capture_output=True, text=True,
                          cwd=cwd)


def clean(value: Any, parent: str = "") -> Any:
    """`value` without volatile keys; absolute paths masked; a published file's SHA-256 left out (safetensors writes
    its header's metadata in hash order, so the bytes of equal tensors differ between processes: the tensors
    themselves are compared by :func:`tensors_digest`)."""
    if isinstance(value, dict):
        return {k: clean(v, k) for k, v in value.items()
                if not VOLATILE.search(str(k)) and not (parent.endswith(".safetensors") and k == "sha256")}
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(/[\w.\-]+)+", "<path>", value)
    return value


def tensors_digest(path: Path) -> str:
    """SHA-256 of every tensor in a safetensors or weights-only torch file, by name."""
    import torch
    from safetensors.torch import load_file

    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def card_text(path: Path) -> str:
    return re.sub(r"\d{4}-\d\d-\d\dT[\d:]+[+\-]\d{4}|(/[\w.\-]+)+|lpconvert [\d.]+\S*", "<x>", path.read_text())


def record(folder: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.name == "metrics.jsonl":
            found[name] = [clean(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json" and path.name not in ("manifest.json",):
            found[name] = clean(json.loads(path.read_text()))
        elif path.name == "README.md":
            found[name] = card_text(path)
        elif path.suffix in (".safetensors", ".pt"):
            found[name] = tensors_digest(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        before, after = (clean(json.loads(p.read_text())) for p in args.compare)
        differing = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        for key in differing:
            print(f"DIFFERS {key}:\n  before {str(before.get(key))[:400]}\n  after  {str(after.get(key))[:400]}")
        print(f"{len(set(before) | set(after)) - len(differing)} records identical, {len(differing)} differ")
        sys.exit(1 if differing else 0)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, command in RUNS.items():
        if (out / name / "report.json").is_file():  # finished by an earlier call
            continue
        done = lpconvert([*command, "--output", str(out / name)], env, out)
        assert done.returncode == 0, (name, done.stderr[-2000:])
    stopped = None if (out / "resumed" / "report.json").is_file() else subprocess.run([sys.executable, "-c", STOP, str(out / "resumed")], env=env, capture_output=True,
                             text=True, cwd=out)
    if stopped is not None:
        resumed = lpconvert(["finetune", "digits_cnn", *COMMON, "--K", "2", "--resume", str(out / "resumed")], env, out)
        assert resumed.returncode == 0, ("resumed", stopped.stderr[-1000:], resumed.stderr[-2000:])
    shared = [flag for i, flag in enumerate(COMMON) if "--seed" not in (flag, COMMON[i - 1])]
    compared = lpconvert(["compare", "digits_cnn", *shared, "--arm", "plain", "--arm", "late: K=2",
                          "--seeds", "0,1", "--output", str(out / "compare")], env, out)
    assert compared.returncode == 0, ("compare", compared.stderr[-2000:])
    digest = {f"{name}/{key}": value for name in sorted(p.name for p in out.iterdir() if p.is_dir())
              for key, value in record(out / name).items()}
    (out / "digest.json").write_text(json.dumps(digest, indent=1, sort_keys=True))
    print(f"{len(digest)} records in {out / 'digest.json'}")


if __name__ == "__main__":
    main()
