"""CIFAR-10 from scratch on a 10,000-image training subset (paper Table 15 analog) as a recipe over `lpconvert compare`:
plain SGD, late-phase BatchNorm, SWA on top of each, and the θ-accumulation control (paper Table 10), paired seeds.

    python scripts/cifar10_10k_scratch.py --seeds 0 1 2 --output runs/cifar10_10k_scratch   # the experiment
    # one point of a γθ / T0 probe sweep (seed 0, 10 epochs, 2,000 test images):
    python scripts/cifar10_10k_scratch.py --epochs 10 --t0-fraction 0.6 --gamma-theta 0.1 --seeds 0 \\
        --arms plain late-phase-BN --eval-subset 2000 --output runs/probe-g01

The script only maps the experiment to one comparison (:func:`lpconvert.compare.command.plan_comparison`, then
:func:`~lpconvert.compare.command.run_comparison`); rerunning the same command continues where it stopped. Protocol (issue
#13): ``cifar_resnet20`` (or ``--model cifar_wrn16_4``) from random initialisation, trained on a fixed, stratified
``--train-subset`` of the CIFAR-10 training images (``subset_seed`` 0: the same images for every arm and seed),
evaluated on the CIFAR-10 test set (``--eval-subset`` of it; all 10,000 by default — also the per-epoch curve), with
CIFAR-100 test as out-of-distribution set. The paper's CIFAR recipe scaled to ``--epochs`` E: SGD Nesterov 0.9,
weight decay 5e-4, batch 128, lr 0.1 held to 0.5 E, linearly annealed to 0.001 at 0.9 E, constant after (the paper's
100/180/200); T0 = ``--t0-fraction`` · E, K = 10, σ0 = 0, γθ = ``--gamma-theta`` (paper 1); SWA arms from
``--swa-fraction`` · E at the constant ``--swa-lr``. T0 = 0.8 E (paper 0.6 E) and SWA lr 0.02 (paper 0.05) by default:
with γθ = 1, θ steps on the SUM of K minibatch gradients (K times the learning rate), and the probe sweep of
zoo/results/cifar10_10k_scratch.md shows that K · lr ≈ 0.75 (T0 = 0.6 E) or 0.5 (SWA lr 0.05) wrecks this short
schedule. The base configuration with the ``late-phase-BN`` arm is zoo/cifar10_10k_scratch_resnet20.yaml.

Everything else is `lpconvert compare`'s: per seed the epochs before T0 are trained once (``seedS/trunk``) and every
arm branches from a copy of it (bitwise the run in one go: tests/test_compare.py), every arm keeps its last epoch and
is evaluated as its averaged model (SWA arms: the SWA average) and, for late-phase arms, as the members' ensemble;
``report.json``/``.md``/``.png`` hold per-seed values, mean ± std and paired differences (95 % interval, p-value).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpconvert.compare.command import run_comparison
from lpconvert.compare.plan import Arm, Comparison, plan_comparison
from lpconvert.config import FinetuneConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = ("plain", "late-phase-BN", "plain+SWA", "late-phase-BN+SWA", "accumulation-control")
LATE = ("late-phase-BN", "late-phase-BN+SWA")
SWA = ("plain+SWA", "late-phase-BN+SWA")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20", help="a registered CIFAR model (cifar_resnet20, "
                                                                   "cifar_wrn16_4)")
    parser.add_argument("--data", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--ood", default=str(SHARED / "data/cifar100/test.tar.gz"))
    parser.add_argument("--epochs", type=int, default=25, help="E")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--K", type=int, default=10, help="members")
    parser.add_argument("--gamma-theta", type=float, default=1.0, help="γθ of the late-phase arms and the control")
    parser.add_argument("--sigma0", type=float, default=0.0)
    parser.add_argument("--t0-fraction", type=float, default=0.8, help="T0 = round(fraction · E)")
    parser.add_argument("--swa-fraction", type=float, default=0.8, help="SWA from epoch round(fraction · E)")
    parser.add_argument("--swa-lr", type=float, default=0.02, help="constant lr during SWA")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (annealed to lr/100)")
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--eval-subset", type=int, default=None, help="CIFAR-10 test images evaluated "
                                                                      "(and the per-epoch curve) [default: all]")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="data-loader processes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: robust on a shared 2-core machine)")
    parser.add_argument("--output", default="runs/cifar10_10k_scratch", help="the comparison's folder")
    args = parser.parse_args(argv)
    T0, swa_start = schedule_epochs(args)
    if not 0 < T0 < args.epochs:
        parser.error(f"T0 = {T0} must lie strictly between 0 and --epochs {args.epochs}")
    if not T0 <= swa_start < args.epochs:
        parser.error(f"SWA start {swa_start} must lie in [T0 = {T0}, {args.epochs}) (the arms branch at T0)")
    return args


def schedule_epochs(args: argparse.Namespace) -> tuple[int, int]:
    return round(args.t0_fraction * args.epochs), round(args.swa_fraction * args.epochs)


def base_config(args: argparse.Namespace) -> FinetuneConfig:
    """The settings every arm shares (with the ``late-phase-BN`` arm: zoo/cifar10_10k_scratch_resnet20.yaml)."""
    T0, _ = schedule_epochs(args)
    E = args.epochs
    return FinetuneConfig(
        model=args.model, pretrained=False, data=args.data, train_subset=args.train_subset,
        val_subset=args.eval_subset, subset_seed=0, workers=args.workers, threads=args.threads,
        late_phase=("batchnorm",), K=args.K, gamma_theta=args.gamma_theta, sigma0=args.sigma0, t0=T0, epochs=E,
        batch_size=args.batch_size, optimizer="sgd", lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="linear", anneal_start=0.5 * E, anneal_end=0.9 * E, lr_end=args.lr / 100, mode="sequential",
        bn_stats="fold", quiet=True,
    )


def arm(name: str, args: argparse.Namespace) -> Arm:
    """What an arm changes from T0 on: K = 1 (plain, SWA over plain, the control accumulating θ over K minibatches)
    or the base's K members; SWA from round(swa_fraction · E)."""
    _, swa_start = schedule_epochs(args)
    settings: dict = {} if name in LATE else {"K": 1}
    if name == "accumulation-control":
        settings["accumulate"] = args.K
    if name in SWA:
        settings.update(swa_start=swa_start, swa_lr=args.swa_lr)
    return Arm(name, settings)


def comparison(args: argparse.Namespace) -> Comparison:
    return plan_comparison(base_config(args), [arm(name, args) for name in args.arms], args.seeds, args.output,
                           ood=[args.ood] if args.ood else [])


def main(argv: list[str] | None = None) -> dict:
    return run_comparison(comparison(parse_args(argv)))


if __name__ == "__main__":
    main()
