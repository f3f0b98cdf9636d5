"""Can weight averaging make a checkpoint nobody here trained better? The issue-#31 experiment as a recipe over
`lpconvert compare`, on the shared pretrained CIFAR-10 ResNet-20 (91.73 % test top-1; trained elsewhere on all
50,000 training images — the mission's "T0 = pretrained").

    python scripts/averaging_resnet20.py --stage probe                 # seed 0: SWA settings, chosen on the selection half
    python scripts/averaging_resnet20.py --stage main --seeds 0 1 2 3 4
    python scripts/averaging_resnet20.py --stage main --train-only     # train every arm now, evaluate later
    python scripts/averaging_resnet20.py --plan                        # print the compare commands only

The checkpoint scores 100 % on any hold-out of its training images, so nothing can be selected on them: every
comparison splits the 10,000 test images once, stratified and fixed (``--selection-split 0.5``, subset seed 0), into a
selection half (soups, α, the probe's choice) and a report half (every number reported). Protocol: the paper's for a
pretrained CIFAR model (Table 9): lr reset to 0.01, annealed linearly to 0.001 over 10 epochs, then constant; 20
epochs; SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 128.

Arms of the main stage: plain fine-tuning (K = 1); late-phase BatchNorm + classifier (K = 10, σ0 = 0.25, γθ = 1/K);
SWA from the start (K = 1); late-phase + SWA — the SWA settings those two share are the probe's choice (``SWA``
below, written down in zoo/results/cifar10_resnet20_averaging.md). compare reports each arm's averaged model, the
late-phase arms' members' ensemble and greedy soup, every arm interpolated with the start, and the start itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpconvert.compare.command import run_comparison, train_arm
from lpconvert.compare.plan import Arm, Comparison, command_line, plan_comparison
from lpconvert.config import FinetuneConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
#: the probe's candidates for SWA from the start (K = 1, seed 0): learning rate, minibatches between samples, epochs
PROBE = {
    "swa-lr0.02-f100-e10": dict(swa_lr=0.02, swa_freq=100, epochs=10),
    "swa-lr0.05-f100-e10": dict(swa_lr=0.05, swa_freq=100, epochs=10),
    "swa-lr0.05-f100-e20": dict(swa_lr=0.05, swa_freq=100, epochs=20),
}
#: the SWA settings the main stage uses (the probe's choice on the selection half)
SWA = dict(swa_start=0, **PROBE["swa-lr0.05-f100-e20"])
LATE = dict(K=10, sigma0=0.25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("probe", "main"), default="main")
    parser.add_argument("--data", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--weights", default=str(SHARED / "weights/cifar10_resnet/resnet20-12fca82f.th"))
    parser.add_argument("--ood", default=str(SHARED / "data/cifar100/test.tar.gz"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="[default: probe 0, main 0 1 2 3 4]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="runs/averaging_resnet20", help="one comparison per stage under it")
    parser.add_argument("--train-only", action="store_true", help="train every arm, evaluate nothing yet")
    parser.add_argument("--plan", action="store_true", help="print the `lpconvert compare` command, run nothing")
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(model="cifar_resnet20", weights=args.weights, data=args.data, epochs=20, batch_size=128,
                          lr=0.01, schedule="linear", anneal_start=0, anneal_end=10, lr_end=0.001, momentum=0.9,
                          nesterov=True, weight_decay=5e-4, late_phase=("batchnorm", "classifier"), K=1,
                          workers=args.workers, threads=args.threads, quiet=True)


def arms(stage: str) -> list[Arm]:
    if stage == "probe":
        return [Arm(name, dict(K=1, swa_start=0, **settings)) for name, settings in PROBE.items()]
    return [Arm("plain", dict(K=1)), Arm("late", dict(LATE)), Arm("swa", dict(K=1, **SWA)),
            Arm("late-swa", dict(LATE, **SWA))]


def comparison(args: argparse.Namespace) -> Comparison:
    seeds = args.seeds if args.seeds is not None else [0] if args.stage == "probe" else [0, 1, 2, 3, 4]
    return plan_comparison(base_config(args), arms(args.stage), seeds, Path(args.output) / args.stage,
                           ood=[args.ood] if args.ood else [], selection_split=0.5)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    planned = comparison(args)
    if args.plan:
        print(command_line(planned))
        return None
    if args.train_only:
        for seed in planned.seeds:
            for arm in planned.arms:
                train_arm(planned, arm, seed)
        return None
    return run_comparison(planned)


if __name__ == "__main__":
    main()
