"""The pretrained-CIFAR experiment: late-phase fine-tuning from a converged CIFAR-10 ResNet (paper's "T0 = pretrained
state", Table 9 analog), against plain fine-tuning and the gradient-accumulation control (Table 10).

    python scripts/pretrained_cifar.py --depth 20 --seeds 0 1 2 --epochs 20              # the full experiment
    python scripts/pretrained_cifar.py --train-subset 10000 --epochs 4 --gammas 1        # a CPU-sized version
    python scripts/pretrained_cifar.py --epochs 1 --schedules imagenet --append          # add runs to the same report

Arms: plain fine-tuning (K = 1); late-phase BatchNorm; late-phase BatchNorm + classifier; the control (K = 1, θ
gradients accumulated over K minibatches). Schedules: ``cifar`` — lr reset to 0.01, linear to 0.001 over the first
half, constant after (the paper: over 10 of 20 epochs); ``imagenet`` — 0.001, ×0.1 at half time. Every run uses the
same data order and augmentation per seed, the LAST epoch (no selection on the test set), and is evaluated on the
CIFAR-10 test set — late-phase runs with every collapse mode and as a non-averaged ensemble — with CIFAR-100 as the
out-of-distribution set. Results (mean ± std over seeds) go to ``--out`` as Markdown and JSON after every run;
``--append`` keeps the runs already in ``--out``'s JSON (same depth, epochs, subset, K and batch size), skips them
and adds the new ones, so an interrupted experiment resumes and several invocations share one table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch

from lpconvert.config import FinetuneConfig
from lpconvert.evaluate import evaluate
from lpconvert.finetune import run

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = {
    "plain": dict(K=1),
    "late-phase BN": dict(late_phase=("batchnorm",)),
    "late-phase BN+classifier": dict(late_phase=("batchnorm", "classifier")),
    "accumulation control": dict(K=1),
}
METRICS = ("top1", "nll", "ece", "auroc/test")
#: Settings that must agree between the runs of one report (``--append``).
SETTING = ("depth", "epochs", "train_subset", "K", "batch_size")


def schedule(name: str, epochs: int) -> dict:
    if name == "cifar":
        return dict(lr=0.01, schedule="linear", anneal_start=0, anneal_end=epochs / 2, lr_end=0.001)
    return dict(lr=0.001, schedule="multistep", milestones=(epochs / 2,), lr_gamma=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20, choices=(20, 32))
    parser.add_argument("--data", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--ood", default=str(SHARED / "data/cifar100/test.tar.gz"))
    parser.add_argument("--weights", default=None, help="[default: the shared checkpoint for --depth]")
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None, help="[default: all 50,000 training images]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=["cifar", "imagenet"], choices=("cifar", "imagenet"))
    parser.add_argument("--gammas", nargs="+", default=["1/K", "1"], choices=("1/K", "1"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", default="runs/pretrained_cifar")
    parser.add_argument("--out", default="zoo/results/cifar10")
    parser.add_argument("--append", action="store_true", help="keep and skip the runs already in --out's JSON")
    args = parser.parse_args()
    report = load_report(args) if args.append else {"setting": {}, "invocations": [], "rows": []}
    report["setting"] = {k: getattr(args, k) for k in SETTING}
    report["invocations"].append({"command": command_line(args), "minutes": 0.0, "hardware": hardware()})
    results: list[dict] = report["rows"]
    done = {(r["schedule"], r["arm"], r["gamma"], r["seed"]) for r in results}
    weights = args.weights or str(next((SHARED / "weights/cifar10_resnet").glob(f"resnet{args.depth}-*.th")))
    common = dict(model=f"cifar_resnet{args.depth}", weights=weights, data=args.data, epochs=args.epochs,
                  batch_size=args.batch_size, train_subset=args.train_subset, workers=args.workers, select="last",
                  momentum=0.9, nesterov=True, weight_decay=5e-4, quiet=True, force=True)
    started = time.time()
    if ("-", "initial (pretrained)", "-", None) not in done:
        initial = evaluate(f"cifar_resnet{args.depth}", args.data, ood=[args.ood], weights=weights,
                           workers=args.workers)
        results.insert(0, {"arm": "initial (pretrained)", "schedule": "-", "gamma": "-", "seed": None,
                           "eval": "model", **initial[0]})
    for sched in args.schedules:
        for arm in args.arms:
            gammas = ["-"] if arm == "plain" else args.gammas
            for gamma in gammas:
                for seed in args.seeds:
                    if (sched, arm, gamma, seed) in done:
                        continue
                    name = f"{sched}-{arm.replace(' ', '_').replace('+', '_')}-g{gamma.replace('/', '')}-s{seed}"
                    settings = dict(common, **schedule(sched, args.epochs), **ARMS[arm], seed=seed,
                                    output=str(Path(args.runs) / name))
                    settings.setdefault("K", args.K)
                    if arm == "accumulation control":
                        settings["accumulate"] = args.K
                    if gamma != "-":
                        K = settings["accumulate"] if arm == "accumulation control" else settings["K"]
                        settings["gamma_theta"] = 1.0 / K if gamma == "1/K" else 1.0
                    run(FinetuneConfig(**settings))
                    late = settings["K"] > 1
                    rows = evaluate(settings["output"], args.data, ood=[args.ood], ensemble=late,
                                    bn_stats="all" if late else "fold", checkpoint="last", workers=args.workers)
                    for row in rows:
                        results.append({"arm": arm, "schedule": sched, "gamma": gamma, "seed": seed,
                                        "eval": row.pop("variant"), **row})
                    print(f"{name}: " + ", ".join(f"{r['eval']} {r['top1']:.2f}" for r in results[-len(rows):]),
                          flush=True)
                    report["invocations"][-1]["minutes"] = (time.time() - started) / 60
                    write_report(report, args, quiet=True)  # partial results survive
    report["invocations"][-1]["minutes"] = (time.time() - started) / 60
    write_report(report, args)


def load_report(args: argparse.Namespace) -> dict:
    path = Path(args.out).with_suffix(".json")
    if not path.is_file():
        return {"setting": {}, "invocations": [], "rows": []}
    report = json.loads(path.read_text())
    ours = {k: getattr(args, k) for k in SETTING}
    if report.get("setting") != ours:
        raise SystemExit(f"{path} holds runs with other settings ({report.get('setting')}, now {ours}); "
                         "choose another --out or drop --append")
    return report


def command_line(args: argparse.Namespace) -> str:
    skip = ("data", "ood", "weights", "runs", "out", "append")
    flags = [f"--{k.replace('_', '-')} {' '.join(shlex.quote(str(x)) for x in v) if isinstance(v, list) else v}"
             for k, v in vars(args).items() if v is not None and k not in skip]
    return "python scripts/pretrained_cifar.py " + " ".join(flags) + (" --append" if args.append else "")


def hardware() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    return f"{name}, {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_report(report: dict, args: argparse.Namespace, quiet: bool = False) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    groups: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        groups.setdefault((row["schedule"], row["arm"], row["gamma"], row["eval"]), []).append(row)

    def cell(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows if key in r]
        if len(values) == 1:
            return f"{values[0]:.4g}" if key != "top1" else f"{values[0]:.2f}"
        mean, std = statistics.mean(values), statistics.stdev(values)
        return f"{mean:.2f} ± {std:.2f}" if key == "top1" else f"{mean:.4f} ± {std:.4f}"

    invocations = report["invocations"]
    lines = [
        f"# Pretrained CIFAR-10 ResNet-{args.depth}: late-phase vs plain fine-tuning",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}, {sum(i['minutes'] for i in invocations):.0f} min in all. "
        f"Command{'s' if len(invocations) > 1 else ''} (hardware, minutes):",
        "",
        "```bash",
        *(f"{i['command']}    # {i['hardware']}, {i['minutes']:.0f} min" for i in invocations),
        "```",
        "",
        f"Training: {'all 50,000' if args.train_subset is None else f'a stratified {args.train_subset:,}-image subset of the'}"
        f" CIFAR-10 training images, {args.epochs} epoch{'s' if args.epochs != 1 else ''}, batch {args.batch_size}, "
        f"K = {args.K}, SGD Nesterov 0.9, weight decay 5e-4. Schedules over the run's length: cifar = lr 0.01 "
        "linearly to 0.001 over the first half, constant after; imagenet = lr 0.001, ×0.1 at half time. The last "
        "epoch is reported (no selection on the test set). Test: the 10,000 CIFAR-10 "
        "test images; OOD: the 10,000 CIFAR-100 test images (AUROC of the predictive entropy). Seeds: "
        f"{', '.join(map(str, args.seeds))} (same data order and augmentation per seed across arms). Mean ± std "
        "over seeds.",
        "",
        "| schedule | arm | γθ | evaluated as | top-1 % | NLL | ECE | OOD AUROC |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for (sched, arm, gamma, evaluated), rows in groups.items():
        evaluated = "model (K = 1)" if arm in ("plain", "accumulation control") else evaluated
        lines.append(f"| {sched} | {arm} | {gamma} | {evaluated} | " + " | ".join(cell(rows, k) for k in METRICS) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
