"""The offline demo: the whole pipeline on real images that a fresh install already has.

scikit-learn ships 1,797 handwritten 8x8 digits. The demo trains a small BatchNorm CNN on them for a few epochs
(the "pretrained" checkpoint, T0), then fine-tunes that checkpoint through :func:`lpconvert.train.finetune.run` — late-phase
(K members of BatchNorm + classifier, averaged at the end) and plain (K = 1, the identical pipeline) — with several
seeds, and prints initial / plain / late-phase test accuracy. Like every run, each selects its epoch on digits held
out of the training images (``--val-split``) and is evaluated once on the test digits.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from lpconvert.config import FinetuneConfig
from lpconvert.data import DIGITS
from lpconvert.errors import LatePhaseError
from lpconvert.files import atomic_write_json
from lpconvert.run.ownership import DEMO_MARKER, REPLACING, check_replaceable, recognise, swap_into_place
from lpconvert.train.finetune import run

PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 2, 6

#: The demo's CPU threads: its numbers are bit-identical for a fixed count, and its model is too small to gain from
#: more threads than one, which on a busy machine only wait for each other (zoo/BENCHMARKS.md).
DEMO_THREADS = 1


def run_demo(output: Path, K: int = 4, seeds: int = 3, force: bool = False,
             threads: int | None = DEMO_THREADS) -> str:
    """Pretrain once, fine-tune late-phase and plain with `seeds` seeds under `output`; return the result table.

    With `force`, an earlier demo folder (and only that) is replaced once the new demo is complete. `threads`: CPU
    threads (None: lpconvert's default, which follows the machine's CPUs and load); the default, 1, gives the
    README's numbers on any machine, busy or not."""
    replacing = check_replaceable(output, "demo", "--output", force)
    folder = output.with_name(output.name + REPLACING) if replacing else output
    if replacing and folder.exists():
        if recognise(folder) != "demo" and any(folder.iterdir()):
            raise LatePhaseError(f"{folder} is in the way of the replacement and was not made by lpconvert; move it")
        shutil.rmtree(folder)  # an earlier replacement that never finished
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / DEMO_MARKER, {"kind": "demo", "K": K, "seeds": seeds})
    common = dict(data=DIGITS, batch_size=32, workers=0, quiet=True, momentum=0.9, weight_decay=5e-4, threads=threads)
    pretrain = run(FinetuneConfig(
        model="digits_cnn", pretrained=False, K=1, epochs=PRETRAIN_EPOCHS, lr=0.05, schedule="cosine",
        select="last", output=str(folder / "pretrained"), **common,
    ))
    finetune = dict(model=f"local-dir:{pretrain['model_dir']}", epochs=FINETUNE_EPOCHS, lr=0.02, schedule="constant",
                    nesterov=True, late_phase=("batchnorm", "classifier"), **common)
    results: dict[str, list[dict]] = {"plain": [], "late": []}
    for seed in range(seeds):
        results["late"].append(run(FinetuneConfig(K=K, seed=seed, output=str(folder / f"late-phase-seed{seed}"),
                                                   **finetune)))
        results["plain"].append(run(FinetuneConfig(K=1, seed=seed, output=str(folder / f"plain-seed{seed}"),
                                                   **finetune)))
    if replacing:
        swap_into_place(folder, output)

    def summary(name: str, reports: list[dict]) -> str:
        accs = [r["test_top1"] for r in reports]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = " ".join(f"{a:.2f}" for a in accs)
        model_dir = output / Path(reports[0]["model_dir"]).relative_to(folder)
        return f"{name:<28} {statistics.mean(accs):7.2f} ± {spread:4.2f}   {per_seed:<20} {model_dir}"

    lines = [
        f"handwritten digits (scikit-learn): 1,080 training, 120 held-out validation (selection), 597 test images; "
        f"T0 = {PRETRAIN_EPOCHS} epochs of training, then {FINETUNE_EPOCHS} fine-tuning epochs, {seeds} seeds",
        "",
        f"{'model':<28} {'top-1 % (mean ± std)':<22} {'per seed':<20} files (seed 0)",
        f"{'pretrained checkpoint (T0)':<28} {pretrain['test_top1']:7.2f}          {'':<20} {output / 'pretrained/model'}",
        summary("plain fine-tuning", results["plain"]),
        summary(f"late-phase K={K}, averaged", results["late"]),
    ]
    return "\n".join(lines)
