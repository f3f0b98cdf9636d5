"""What ensembles are for, on the shared pretrained CIFAR-10 ResNet-20 and ResNet-32: clean top-1, calibration before
and after temperature scaling, OOD AUROC against CIFAR-100, and accuracy under the 15 generated corruptions (mCE).

    python scripts/robustness.py                                     # writes zoo/results/cifar10_robustness.{md,json}
    python scripts/robustness.py --corruption-subset 1000 --severities 1,3,5

Everything goes through ``lpconvert.evaluate.command.evaluate`` (the command ``lpconvert evaluate``):

1. each model on the 10,000 CIFAR-10 test images with ``--calibration-split 0.5`` (a fixed stratified half fits the
   temperature, the other half reports) and ``--ood cifar100`` (CIFAR-100's 10,000 test images);
2. the corrupted sets generated once (timed: the corruption cost per 10,000 images), on ``--corruption-subset`` images
   of the test set (stratified, seed 0; all 10,000 by default) — CPU time decides how many;
3. ResNet-32 on them with ResNet-20 as ``--reference`` (Hendrycks' relative CE), which also evaluates ResNet-20.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lpconvert.evaluate.command import eval_set, evaluate
from lpconvert.evaluate.corruptions import (
    CORRUPTIONS,
    LIBRARY,
    SEVERITIES,
    generated_sets,
    library_versions,
)
from lpconvert.files import atomic_write_bytes, atomic_write_json
from lpconvert.publish.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = {20: SHARED / "weights/cifar10_resnet/resnet20-12fca82f.th",
           32: SHARED / "weights/cifar10_resnet/resnet32-d509ac18.th"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "data/cifar10/test.tar.gz"))
    parser.add_argument("--ood", default=str(SHARED / "data/cifar100/test.tar.gz"))
    parser.add_argument("--subset", type=int, default=None, help="clean pass on a subset (a quick check of the script)")
    parser.add_argument("--corruption-subset", type=int, default=None, help="[default: all test images]")
    parser.add_argument("--corruption-types", default=",".join(CORRUPTIONS))
    parser.add_argument("--severities", default=",".join(map(str, SEVERITIES)))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", default=str(ROOT / "zoo/results/cifar10_robustness"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    types, severities = args.corruption_types.split(","), [int(s) for s in args.severities.split(",")]
    common = dict(data=args.data, batch_size=args.batch_size, workers=args.workers, device="cpu")
    result: dict = {"setup": {"data": f"CIFAR-10 test set ({args.subset or 10_000} images)",
                              "ood": f"CIFAR-100 test set ({args.subset or 10_000} images)",
                              "calibration": "temperature fitted on a fixed stratified half, reported on the other",
                              "corruption_subset": args.corruption_subset, "types": types, "severities": severities,
                              "libraries": library_versions(), "torch_threads": torch.get_num_threads(),
                              "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine()},
                    "clean": {}}
    for depth, weights in WEIGHTS.items():
        start = time.perf_counter()
        row = evaluate(f"cifar_resnet{depth}", weights=str(weights), ood=(args.ood,), calibration_split=0.5,
                       subset=args.subset, **common)[0]
        result["clean"][f"resnet{depth}"] = {**row, "seconds": time.perf_counter() - start}
        print(f"resnet{depth}: clean done in {time.perf_counter() - start:.0f} s", flush=True)
    model, _ = load_model("cifar_resnet20", weights=str(WEIGHTS[20]), pretrained=False)
    dataset = eval_set(model, args.data, subset=args.corruption_subset, batch_size=args.batch_size,
                       workers=args.workers, num_classes=10).dataset
    sets, info = generated_sets(dataset, dataset.transform, types=types, severities=severities, workers=args.workers)
    per_10k = info["seconds"] / max(info["images"], 1) * 10_000
    result["corruption_time"] = {"images": info["images"], "sets": len(sets), "seconds": info["seconds"],
                                 "seconds_per_10k_images_all_sets": per_10k,
                                 "seconds_per_10k_images_per_set": per_10k / max(len(sets), 1)}
    print(f"corrupted {info['images']} images {len(sets)} ways in {info['seconds']:.0f} s", flush=True)
    start = time.perf_counter()
    rows = evaluate("cifar_resnet32", weights=str(WEIGHTS[32]), subset=args.corruption_subset, corruptions=True,
                    corruption_types=types, severities=severities, reference="cifar_resnet20",
                    reference_weights=str(WEIGHTS[20]), **common)
    result["corruptions"] = {"resnet32": rows[0], "resnet20": rows[1], "seconds": time.perf_counter() - start}
    atomic_write_json(f"{args.out}.json", result)
    atomic_write_bytes(f"{args.out}.md", markdown(result).encode())
    return result


def markdown(result: dict) -> str:
    setup, clean, corr, timing = result["setup"], result["clean"], result["corruptions"], result["corruption_time"]
    total = timing["seconds"] + corr["seconds"] + sum(clean[n]["seconds"] for n in ("resnet20", "resnet32"))
    names = ("resnet20", "resnet32")
    lines = ["# CIFAR-10 robustness of the shared pretrained ResNet-20 / ResNet-32", "",
             "Produced by `python scripts/robustness.py` (`lpconvert evaluate` underneath) on the CPU "
             f"({setup['cpus']} CPU(s), {setup['torch_threads']} torch thread(s)).", "",
             "## Clean test set, calibration, OOD", "",
             f"| model | top-1 % ({clean['resnet20']['count']:,}) | T | NLL → NLL(T) | ECE → ECE(T) "
             "| Brier → Brier(T) | AUROC CIFAR-100 (entropy) | AUROC (MSP) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = clean[name]
        lines.append(f"| {name} | {r['top1']:.2f} | {r['calibration/temperature']:.3f} | "
                     f"{r['calibration/nll']:.4f} → {r['calibration/nll_ts']:.4f} | "
                     f"{r['calibration/ece']:.4f} → {r['calibration/ece_ts']:.4f} | "
                     f"{r['calibration/brier']:.4f} → {r['calibration/brier_ts']:.4f} | {r['auroc/cifar100']:.4f} | "
                     f"{r['auroc_msp/cifar100']:.4f} |")
    r = clean[names[0]]
    lines += ["", f"The temperature is fitted (NLL minimised) on a fixed stratified half of the test images "
                  f"({r['calibration/fit_count']}), the same for both models; NLL, ECE (15 bins) and Brier (summed "
                  f"over classes) before → after are on the other {r['calibration/count']}. AUROC: "
                  f"{r['count']:,} CIFAR-10 test images against as many CIFAR-100 test images, OOD = positive.", ""]
    count = corr["resnet20"].get("corruption/count")
    severities = setup["severities"]
    lines += ["## Generated corruptions", "",
              f"{len(setup['types'])} corruption types × severities {', '.join(map(str, severities))} "
              f"({len(setup['types']) * len(severities)} sets) on {count} test images"
              + (" (a stratified subset, seed 0: the CPU time of all 10,000 × 75 sets did not fit this run)"
                 if setup["corruption_subset"] else "") + f", generated by {LIBRARY} "
              f"{setup['libraries'].get(LIBRARY, '?')} with ImageNet-C's severity parameters — harsher on 32-px "
              "images than the published CIFAR-10-C (e.g. Gaussian noise σ 0.08–0.38 against 0.04–0.10; blur "
              "radii and elastic displacements are pixel sizes chosen for 224-px images), so accuracies fall far below "
              "published CIFAR-10-C figures: compare the two models with each "
              "other, not with CIFAR-10-C papers. mCE = mean top-1 error over all sets; "
              "CE relative to ResNet-20 = 100 × Σ_s error / Σ_s ResNet-20's error, averaged over the types.", "",
              "| model | mCE % | mCE rel. to ResNet-20 | " + " | ".join(f"top-1 % sev. {s}" for s in severities)
              + " |", "|---|---|---|" + "---|" * len(severities)]
    for name in names:
        r = corr[name]
        lines.append(f"| {name} | {r['mce']:.2f} | {r.get('mce_ref', float('nan')):.1f} | "
                     + " | ".join(f"{r[f'corruption/severity{s}']:.2f}" for s in severities) + " |")
    lines += ["", "Top-1 % per corruption (mean over the severities) and relative CE of ResNet-32:", "",
              "| corruption | ResNet-20 | ResNet-32 | CE ResNet-32 |", "|---|---|---|---|"]
    for c in setup["types"]:
        means = [sum(corr[n][f"corruption/{c}/{s}"] for s in severities) / len(severities) for n in names]
        lines.append(f"| {c} | {means[0]:.2f} | {means[1]:.2f} | {corr['resnet32'][f'ce/{c}']:.1f} |")
    lines += ["", "## Time", "",
              f"Corrupting {timing['images']} images {timing['sets']} ways took {timing['seconds']:.0f} s on one "
              f"process (nice 19, other jobs sharing the 2 CPUs): {timing['seconds_per_10k_images_all_sets'] / 60:.0f} "
              f"min per 10,000 images for all {timing['sets']} sets, "
              f"{timing['seconds_per_10k_images_per_set']:.0f} s per 10,000 images and set. Evaluating both models "
              f"on the corrupted sets took {corr['seconds']:.0f} s (one run, {total / 60:.0f} min in all); the "
              f"clean/calibration/OOD pass "
              f"{clean['resnet20']['seconds']:.0f} s (ResNet-20) and {clean['resnet32']['seconds']:.0f} s "
              "(ResNet-32).", ""]
    return "\n".join(lines)


def rewrite_markdown(out: str) -> None:
    """Write ``OUT.md`` again from ``OUT.json`` (after a change to the text, without rerunning)."""
    atomic_write_bytes(f"{out}.md", markdown(json.loads(Path(f"{out}.json").read_text())).encode())


if __name__ == "__main__":
    print(json.dumps(main(), indent=2)[:2000])
