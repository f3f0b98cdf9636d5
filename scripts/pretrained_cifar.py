"""The pretrained-CIFAR experiment as a recipe over `lpconvert compare`: late-phase fine-tuning from a converged
CIFAR-10 ResNet (paper's "T0 = pretrained state", Table 9 analog) against plain fine-tuning and the
gradient-accumulation control (Table 10).

    python scripts/pretrained_cifar.py --depth 20 --seeds 0 1 2 --epochs 20              # the full experiment
    python scripts/pretrained_cifar.py --train-subset 10000 --epochs 4 --gammas 1        # a CPU-sized version
    python scripts/pretrained_cifar.py --plan                                            # print the commands only

This script only maps the experiment to comparisons: one ``lpconvert compare`` per schedule (``--output``/SCHEDULE),
whose arms are plain fine-tuning (K = 1), late-phase BatchNorm, late-phase BatchNorm + classifier and the control
(K = 1, θ's gradient accumulated over K minibatches), each late-phase arm and the control once per γθ (``1/K`` or
``1``). Schedules: ``cifar`` — lr reset to 0.01, linear to 0.001 over the first half, constant after (the paper: over
10 of 20 epochs); ``imagenet`` — 0.001, ×0.1 at half time. Pairing, training, evaluation (averaged model, and the
members' ensemble for late-phase arms; CIFAR-100 as OOD set), statistics and the report (``report.json``/``.md``/
``.png``: per-seed values, mean ± std, paired differences with 95 % interval and p-value) are `lpconvert compare`'s;
rerunning the same command continues where it stopped. ``--plan`` prints the equivalent ``lpconvert compare``
commands instead of running them. The pretrained checkpoint itself: ``lpconvert evaluate cifar_resnet20 --weights
W --data D --ood O``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpconvert.compare.command import run_comparison
from lpconvert.compare.plan import Arm, Comparison, command_line, plan_comparison
from lpconvert.config import FinetuneConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
#: arm → its settings over the base (γθ and K filled in per arm by :func:`arms`)
ARMS = {
    "plain": dict(K=1),
    "late-phase-BN": dict(late_phase=("batchnorm",)),
    "late-phase-BN+classifier": dict(late_phase=("batchnorm", "classifier")),
    "accumulation-control": dict(K=1),
}
GAMMAS = ("1/K", "1")


def schedule(name: str, epochs: int) -> dict:
    if name == "cifar":
        return dict(lr=0.01, schedule="linear", anneal_start=0, anneal_end=epochs / 2, lr_end=0.001)
    return dict(lr=0.001, schedule="multistep", milestones=(epochs / 2,), lr_gamma=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--gammas", nargs="+", default=list(GAMMAS), choices=GAMMAS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--output", default="runs/pretrained_cifar", help="one comparison per schedule under it")
    parser.add_argument("--plan", action="store_true", help="print the `lpconvert compare` commands, run nothing")
    return parser.parse_args(argv)


def weights(args: argparse.Namespace) -> str:
    return args.weights or str(next((SHARED / "weights/cifar10_resnet").glob(f"resnet{args.depth}-*.th")))


def base_config(args: argparse.Namespace, sched: str) -> FinetuneConfig:
    """The settings every arm of one schedule shares (T0 = 0: the pretrained state)."""
    return FinetuneConfig(model=f"cifar_resnet{args.depth}", weights=weights(args), data=args.data,
                          epochs=args.epochs, batch_size=args.batch_size, train_subset=args.train_subset, K=args.K,
                          workers=args.workers, momentum=0.9, nesterov=True, weight_decay=5e-4, quiet=True,
                          **schedule(sched, args.epochs))


def arms(args: argparse.Namespace) -> list[Arm]:
    """plain once; every other arm once per γθ (``-g1K``: 1/K, ``-g1``: 1); the control accumulates over K."""
    result = []
    for name in args.arms:
        for gamma in ["-"] if name == "plain" else args.gammas:
            settings = dict(ARMS[name])
            if name != "plain":
                settings.setdefault("K", args.K)
                if name == "accumulation-control":
                    settings["accumulate"] = args.K
                settings["gamma_theta"] = 1.0 / args.K if gamma == "1/K" else 1.0
            result.append(Arm(name if gamma == "-" else f"{name}-g{gamma.replace('/', '')}", settings))
    return result


def comparisons(args: argparse.Namespace) -> list[Comparison]:
    return [plan_comparison(base_config(args, sched), arms(args), args.seeds, Path(args.output) / sched,
                            ood=[args.ood] if args.ood else []) for sched in args.schedules]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    planned = comparisons(args)
    if args.plan:
        print("\n".join(command_line(c) for c in planned))
        return []
    return [run_comparison(c) for c in planned]


if __name__ == "__main__":
    main()
