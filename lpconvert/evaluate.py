"""`lpconvert evaluate`: the paper's metrics for a model, an output directory or a late-phase run.

Top-1/top-5, NLL, ECE, OOD AUROC (predictive entropy; per OOD set and their mean), optionally the flatness score
δL(σz) of Fig. 3; for a late-phase run also the non-averaged ensemble (``--ensemble``, mean of the members' softmax)
and every collapse mode side by side (``--bn-stats all``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import timm.data
from torch import nn
from torch.utils.data import DataLoader, Subset

from .collapse import collapse, ensemble_predict
from .config import FinetuneConfig
from .data import (
    DIGITS,
    Source,
    build_data,
    build_datasets,
    digits_datasets,
    hub_splits,
    recalibration_loader,
    resolve_data_dirs,
    stratified_indices,
)
from .errors import LatePhaseError
from .evaluation import evaluate_model, flatness
from .late_phase_model import load_late_phase
from .layers import BN_STATS_MODES
from .loading import load_model
from .metrics import METRIC_NAMES
from .run_dir import is_run
from .run_state import RunCheckpoint
from .runtime import resolve_device


def _splits(data: str | None, dataset: str | None) -> tuple[Source | None, Source]:
    """The (training, validation) splits of ``--dataset hfds/NAME`` or of a data root (validation: the first of val,
    validation, test) — both `data` itself when it is one ImageFolder tree (a folder or a tar archive)."""
    if data == DIGITS:  # scikit-learn's digits, as `lpconvert finetune --data sklearn-digits` splits them
        return DIGITS, DIGITS
    if dataset is not None:
        train, val = hub_splits(dataset)
    else:
        try:
            train, val = resolve_data_dirs(data=data)
        except LatePhaseError:  # not a root with train/ and val/: a single tree (or an archive of one)
            tree = resolve_data_dirs(val_dir=data)[1]
            return tree, tree
    if val is None:
        raise LatePhaseError(f"no val, validation or test split in {dataset or data}; pass data with one")
    return train, val


def eval_set(model: nn.Module, data: str | Source, *, subset: int | None, batch_size: int, workers: int,
             num_classes: int | None, class_map: str | None = None) -> DataLoader:
    """Evaluation-transform loader (the model's timm data config) over a split, or over the validation split of the
    data path `data`; labels by `class_map` (a run's ``--class-map``; default ``"auto"``)."""
    if data == DIGITS:  # the test split that `lpconvert finetune --data sklearn-digits` validates on
        digits = digits_datasets()[1]
        if subset is not None:
            digits = Subset(digits, stratified_indices(digits.tensors[1].tolist(), subset, 0))
        return DataLoader(digits, batch_size=batch_size, shuffle=False, num_workers=workers)
    config = timm.data.resolve_data_config(model=model)
    source = _splits(data, None)[1] if isinstance(data, str) else data
    _, dataset = build_datasets(None, source, data_config=config, num_classes=num_classes,
                                class_map=class_map or "auto", val_subset=subset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def _recalibration_set(model: nn.Module, checkpoint: RunCheckpoint, train: Source) -> DataLoader:
    """The batches the run itself recalibrates on (:func:`lpconvert.data.recalibration_loader`): the training split
    `train` built with the run's settings (labels, subset, augmentation, batch size, seed)."""
    config = FinetuneConfig.from_saved({**checkpoint.config, "resume": None, "force": False, "workers": 0,
                                       **({"data": DIGITS, "dataset": None} if train == DIGITS else {})})
    sources = None if train == DIGITS else (train, train)
    held_out = "test" in (checkpoint.data_fingerprint or {})  # the run validated on images held out of `train`
    data = build_data(config, model, sources=sources, evaluation="test" if held_out else "validation")
    return recalibration_loader(data.train, config.batch_size, seed=config.seed)


def _check_options(batch_size: int, workers: int, subset: int | None, flatness_sigmas: Sequence[float],
                   flatness_draws: int) -> None:
    problems = [
        (batch_size >= 1, f"--batch-size must be a positive integer, got {batch_size}"),
        (workers >= 0, f"--workers must be 0 or more, got {workers}"),
        (subset is None or subset >= 1, f"--subset must be a positive integer, got {subset}"),
        (all(math.isfinite(s) and s >= 0 for s in flatness_sigmas),
         f"--flatness takes σz values >= 0, got {','.join(map(str, flatness_sigmas))}"),
        (flatness_draws >= 1, f"--flatness-draws must be a positive integer, got {flatness_draws}"),
    ]
    for ok, message in problems:
        if not ok:
            raise LatePhaseError(message)


def evaluate(
    source: str,
    data: str | None = None,
    *,
    dataset: str | None = None,
    ood: Sequence[str] = (),
    ensemble: bool = False,
    bn_stats: str | None = None,
    checkpoint: str = "best",
    weights: str | None = None,
    subset: int | None = None,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    flatness_sigmas: Sequence[float] = (),
    flatness_draws: int = 10,
) -> list[dict[str, Any]]:
    """One row of metrics per evaluated variant of `source` (a model spec, output directory or late-phase run), on
    the validation split of `data` (a root, or one ImageFolder tree or archive) or of `dataset` (``hfds/NAME``)."""
    _check_options(batch_size, workers, subset, flatness_sigmas, flatness_draws)
    if (data is None) == (dataset is None):
        raise LatePhaseError("pass the evaluation data: --data (folders or tar archives) or --dataset hfds/NAME")
    device_ = resolve_device(device)
    class_map = None
    train, val_split = _splits(data, dataset)
    rows: list[tuple[str, nn.Module | None, Any]] = []
    if is_run(source):
        late, run = load_late_phase(source, checkpoint)
        late.to(device_)
        modes = BN_STATS_MODES if bn_stats == "all" else (bn_stats or run.config.get("bn_stats", "fold"),)
        class_map = run.config.get("class_map")
        if "recalibrate" in modes and train is None:
            raise LatePhaseError(f"--bn-stats recalibrate needs a training split, and {dataset or data} has none")
        for mode in modes:
            recal = _recalibration_set(late, run, train) if mode == "recalibrate" else None
            averaged = collapse(late, bn_stats=mode, data=recal, num_batches=run.config.get("recalibrate_batches"))
            rows.append((f"averaged ({mode})", averaged, None))
        if ensemble:
            rows.append((f"ensemble (K={run.late_phase.K}, not averaged)", None, partial(ensemble_predict, late)))
        reference = late
    else:
        if ensemble or bn_stats:
            raise LatePhaseError("--ensemble and --bn-stats need a late-phase run (a `lpconvert finetune` output folder)")
        model, _ = load_model(source, weights=weights, pretrained=weights is None)
        rows.append(("model", model.to(device_), None))
        reference = model
    num_classes = getattr(reference, "num_classes", None)
    val = eval_set(reference, val_split, subset=subset, batch_size=batch_size, workers=workers,
                   num_classes=num_classes, class_map=class_map)
    ood_loaders = {Path(p).name.split(".")[0] or p: eval_set(reference, p, subset=subset, batch_size=batch_size,
                                                             workers=workers, num_classes=None) for p in ood}
    results = []
    for name, model, predict in rows:
        metrics = evaluate_model(model, val, device=device_, ood_loaders=ood_loaders or None, predict_fn=predict,
                                 progress=f"evaluating {name}")
        row = {"variant": name, **{k: metrics[k] for k in METRIC_NAMES}, "count": metrics["count"]}
        row.update({k: v for k, v in metrics.items() if k.startswith("auroc/")})
        if flatness_sigmas and model is not None:
            batches = [batch for _, batch in zip(range(4), val)]
            for sigma, value in flatness(model, batches, list(flatness_sigmas), draws=flatness_draws).items():
                row[f"flatness/{sigma:g}"] = value["mean"]
        results.append(row)
    return results


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("variant", "count")]
    width = max(len(r["variant"]) for r in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>12}" for k in keys)]
    for row in rows:
        lines.append(f"{row['variant']:<{width}}  " + "  ".join(f"{row.get(k, float('nan')):>12.4f}" for k in keys))
    return "\n".join(lines) + f"\n({rows[0]['count']} images; top-1/top-5 in %, ECE and AUROC as fractions)"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
