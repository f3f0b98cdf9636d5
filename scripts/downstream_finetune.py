"""Is a collapsed checkpoint a drop-in? Fine-tune it further (BatchNorm in train mode) and compare with the original.

    python scripts/downstream_finetune.py                          # shared CIFAR-10 ResNet-20, about 10 min on 2 cores

1. A late-phase run from the shared CIFAR-10 ResNet-20 (K = 10, late-phase BatchNorm, one epoch on a stratified
   subset of the training images) gives members that really differ.
2. Its members are collapsed three ways: ``fold`` (lpconvert's default: the members' mean statistics, γ and β solved
   for the members' average output), ``mean`` (Eq. 1 on γ, β and the statistics), and, for comparison, the fold of
   lpconvert 0.1 (γ' = mean_k γ_k/√(v_k+ε), β' = mean_k(β_k − γ_k μ_k/√(v_k+ε)), statistics 0 and 1 − ε): the same
   eval-mode function as ``fold``, but not a BatchNorm of its input. The original checkpoint is the control.
3. Each model is fine-tuned downstream as a user would — plain SGD (K = 1), BatchNorm in train mode, one epoch at
   lr 1e-3 — and evaluated on the full CIFAR-10 test set before and after.

Writes the table to ``--out`` (Markdown) and prints it.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import lpconvert
from lpconvert.config import FinetuneConfig
from lpconvert.evaluate.command import evaluate
from lpconvert.layers import LatePhaseBatchNorm
from lpconvert.publish.loading import load_model
from lpconvert.train.finetune import run

SHARED = Path(__file__).resolve().parents[2] / "shared"


def fold_v01(late: torch.nn.Module) -> torch.nn.Module:
    """lpconvert 0.1's fold, for comparison only: statistics (0, 1 − ε) with the members' affine maps averaged."""
    model = lpconvert.collapse(late, bn_stats="mean")
    with torch.no_grad():
        for name, layer in lpconvert.late_phase_layers(late).items():
            if isinstance(layer, LatePhaseBatchNorm):
                bn, eps = model.get_submodule(name), layer.template.eps
                scale = layer.weight / torch.sqrt(layer.running_var + eps)
                bn.weight.copy_(scale.mean(0))
                bn.bias.copy_((layer.bias - scale * layer.running_mean).mean(0))
                bn.running_mean.zero_()
                bn.running_var.fill_(1 - eps)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--weights", default=str(SHARED / "weights/cifar10_resnet/resnet20-12fca82f.th"))
    parser.add_argument("--late-phase-images", type=int, default=5000)
    parser.add_argument("--downstream-images", type=int, default=10000)
    parser.add_argument("--downstream-lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", default="runs/downstream_finetune")
    parser.add_argument("--out", default="zoo/results/downstream_finetune.md")
    args = parser.parse_args()
    started, runs = time.time(), Path(args.runs)
    common = dict(data=args.data, batch_size=128, workers=args.workers, quiet=True, select="last", val_subset=1000,
                  momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="constant", epochs=1)
    late_dir = runs / "late-phase"
    if not (late_dir / "checkpoints" / "last.pt").is_file():
        run(FinetuneConfig(model="cifar_resnet20", weights=args.weights, K=10, lr=0.01,
                           train_subset=args.late_phase_images, output=str(late_dir), **common))
    late, _ = lpconvert.load_late_phase(late_dir, "last")
    original, source = load_model("cifar_resnet20", weights=args.weights)
    models = {
        "original checkpoint": original,
        "collapsed, fold (default)": lpconvert.collapse(late, bn_stats="fold"),
        "collapsed, mean": lpconvert.collapse(late, bn_stats="mean"),
        "collapsed, fold of lpconvert 0.1": fold_v01(late),
    }
    rows = []
    for i, (name, model) in enumerate(models.items()):
        folder = runs / f"model-{i}"
        if not folder.is_dir():
            lpconvert.save_pretrained(copy.deepcopy(model).eval(), folder, source=source)
        before = evaluate(str(folder), args.data, workers=args.workers)[0]["top1"]
        tuned = runs / f"downstream-{i}"
        if not (tuned / "report.json").is_file():
            run(FinetuneConfig(model=f"local-dir:{folder}", K=1, lr=args.downstream_lr,
                               train_subset=args.downstream_images, output=str(tuned), **common))
        after = evaluate(str(tuned / "model"), args.data, workers=args.workers)[0]["top1"]
        rows.append((name, before, after))
        print(f"{name}: {before:.2f} -> {after:.2f}", flush=True)
    lines = [
        "# Downstream fine-tuning of a collapsed checkpoint (is it a drop-in?)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on the CPU ({torch.get_num_threads()} threads), "
        f"{(time.time() - started) / 60:.0f} min: `python scripts/downstream_finetune.py` (see its docstring).",
        "",
        f"Members: the shared CIFAR-10 ResNet-20 fine-tuned late-phase (K = 10, BatchNorm, one epoch on "
        f"{args.late_phase_images:,} training images, lr 0.01). Downstream: plain SGD (Nesterov 0.9, wd 5e-4, "
        f"batch 128), BatchNorm in train mode, one epoch at lr {args.downstream_lr:g} on {args.downstream_images:,} "
        "training images. Top-1 on the 10,000 CIFAR-10 test images.",
        "",
        "| model | top-1 % before | top-1 % after downstream fine-tuning |",
        "|---|---:|---:|",
        *(f"| {name} | {before:.2f} | {after:.2f} |" for name, before, after in rows),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
