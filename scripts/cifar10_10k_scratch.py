"""CIFAR-10 from scratch on a 10,000-image training subset (paper Table 15 analog), at CPU size: plain SGD, late-phase
BatchNorm, SWA on top of each, and the θ-accumulation control (paper Table 10), several paired seeds.

    # the experiment of zoo/results/cifar10_10k_scratch.md (2 CPU cores, frozen code in a worktree; the defaults
    # are its settings: 25 epochs, T0 = 20, γθ = 1, K = 10, SWA from epoch 20 at lr 0.02):
    SHARED=$PWD/../shared REPO=$PWD && git worktree add --detach /tmp/lpconvert-exp/code HEAD
    cp scripts/cifar10_10k_scratch.py /tmp/lpconvert-exp/code/scripts/ && cd /tmp/lpconvert-exp/code
    LPCONVERT_CACHE=/tmp/lpconvert-cache PYTHONPATH=$PWD python scripts/cifar10_10k_scratch.py --seeds 0 1 2 \\
        --data $SHARED/data/cifar10 --ood $SHARED/data/cifar100/test.tar.gz --runs /tmp/lpconvert-exp/runs \\
        --out $REPO/zoo/results/cifar10_10k_scratch --append
    # the same command again continues an interrupted experiment where it stopped (--append)

    # one point of the γθ / T0 probe sweep of the report (seed 0, 10 epochs, 2,000 test images):
    python scripts/cifar10_10k_scratch.py --epochs 10 --t0-fraction 0.6 --gamma-theta 0.1 --seeds 0 \\
        --arms plain 'late-phase BN' --eval-subset 2000 --runs /tmp/probe/g01 --out /tmp/probe/g01/report
    python scripts/cifar10_10k_scratch.py --tiny --runs /tmp/tiny --out /tmp/tiny/report   # smoke mode, < 1 min

Protocol (issue #13): ``cifar_resnet20`` (or ``--model cifar_wrn16_4``) from random initialisation, trained on a
fixed, stratified ``--train-subset`` of the CIFAR-10 training images (``subset_seed`` 0: the same images for every
arm and seed) and evaluated on the full 10,000-image test set, CIFAR-100 test as out-of-distribution set. The
paper's CIFAR recipe scaled to ``--epochs`` E: SGD Nesterov 0.9, weight decay 5e-4 (members too), batch 128, lr 0.1
held to 0.5 E, linearly annealed to 0.001 at 0.9 E, constant after (the paper's 100/180/200); T0 = ``--t0-fraction``
· E, K = 10, σ0 = 0, γθ = ``--gamma-theta`` (paper 1); SWA from ``--swa-fraction`` · E (paper 161/200) at the
constant ``--swa-lr``, one average per epoch, BatchNorm statistics re-estimated at the end. T0 = 0.8 E (paper
0.6 E) and SWA lr 0.02 (paper 0.05) by default: with γθ = 1, θ steps on the SUM of K minibatch gradients, i.e. with
K times the learning rate, and the probe sweep in the report shows that K · lr ≈ 0.75 (T0 = 0.6 E) or 0.5 (SWA lr
0.05) wrecks this short schedule, K · lr ≈ 0.2–0.26 does not.

Arms share their plain epochs: per seed, ONE plain run (K = 1, the full schedule) is trained up to the end of epoch
T0 and stopped with a checkpoint; every arm continues from its own copy of that run directory with its settings
(``lpconvert.finetune.run(FinetuneConfig(resume=copy, force=True, ...))``; K = 10 switches to the members at epoch
T0). The same seed gives the same data order and augmentation in every arm, so the arms are paired.
``--check-branching`` also trains the plain and late-phase BN arms in one go each (as ``lpconvert finetune`` with
``--t0`` does) and checks that they end bitwise equal to the branched ones.

Every run keeps the LAST epoch (no selection on the test set); its per-epoch metrics use ``--val-subset`` test images
only as a progress curve. Final models are evaluated on the full test set with ``lpconvert.evaluate.evaluate``: the
averaged model of every arm (``model/`` of the run; SWA arms: the SWA average, statistics recalibrated), and for
the late-phase arms also the non-averaged ensemble of the K members (with SWA: of the K SWA-averaged members, each
member's BatchNorm statistics recalibrated on the training subset). The report (``--out``.json / .md, rewritten
after every arm) gives mean ± std over seeds and the paired differences per seed with a paired t-test. ``--append``
keeps the rows already in ``--out``.json (same settings) and skips them; the run directories under ``--runs`` resume
where they stopped. Text after the line ``<!-- notes -->`` in an existing ``--out``.md is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lpconvert.config import FinetuneConfig
from lpconvert.evaluate import evaluate
from lpconvert.finetune import RunInterrupted, run

from lpconvert.late_phase_model import load_late_phase
from lpconvert.run_state import RunCheckpoint
from lpconvert.stats import paired_difference


def read_checkpoint(path: Path) -> dict:
    """config, model, engine, position (dict), swa (the AveragedModel state or None) of a run checkpoint."""
    state = RunCheckpoint.load(Path(path))
    return {"config": state.config, "model": state.model, "engine": state.engine,
            "position": dataclasses.asdict(state.position), "swa": state.swa}


SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = ("plain", "late-phase BN", "plain + SWA", "late-phase BN + SWA", "accumulation control")
LATE = ("late-phase BN", "late-phase BN + SWA")
SWA = ("plain + SWA", "late-phase BN + SWA")
METRICS = ("top1", "nll", "ece", "ood_auroc")
#: (arm, baseline) pairs of the paired-difference table
COMPARISONS = (
    ("late-phase BN", "plain"),
    ("late-phase BN + SWA", "plain + SWA"),
    ("late-phase BN + SWA", "plain"),
    ("plain + SWA", "plain"),
    ("accumulation control", "plain"),
    ("late-phase BN", "accumulation control"),
)
#: settings that every row of one report (and every run directory under --runs) must share
SETTING = ("model", "epochs", "train_subset", "val_subset", "eval_subset", "batch_size", "K", "gamma_theta",
           "sigma0", "t0_fraction", "swa_fraction", "swa_lr", "lr", "threads")
NOTES = "<!-- notes -->"
TINY = dict(train_subset=128, val_subset=32, eval_subset=100, batch_size=16, epochs=4, K=2, workers=0,
            seeds=[0], t0_fraction=0.5, swa_fraction=0.75, swa_lr=0.05)


# --------------------------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20",
                        help="a registered CIFAR model (cifar_resnet20, cifar_wrn16_4)")
    parser.add_argument("--data", default=str(SHARED / "data/cifar10"))
    parser.add_argument("--ood", default=str(SHARED / "data/cifar100/test.tar.gz"))
    parser.add_argument("--epochs", type=int, default=None, help="E [default 25; --tiny 4]")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="[default 0 1 2; --tiny 0]")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--K", type=int, default=None, help="members [default 10; --tiny 2]")
    parser.add_argument("--gamma-theta", type=float, default=1.0, help="γθ of the late-phase arms and the control")
    parser.add_argument("--sigma0", type=float, default=0.0)
    parser.add_argument("--t0-fraction", type=float, default=None, help="T0 = round(fraction · E) [default 0.8]")
    parser.add_argument("--swa-fraction", type=float, default=None, help="SWA from epoch round(fraction · E) [0.8]")
    parser.add_argument("--swa-lr", type=float, default=None, help="constant lr during SWA [default 0.02]")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (annealed to lr/100)")
    parser.add_argument("--train-subset", type=int, default=None, help="[default 10000; --tiny 128]")
    parser.add_argument("--val-subset", type=int, default=None, help="test images of the per-epoch curve [1000]")
    parser.add_argument("--eval-subset", type=int, default=None, help="test / OOD images of the final evaluation "
                                                                      "[default: all 10,000; --tiny 100]")
    parser.add_argument("--batch-size", type=int, default=None, help="[default 128; --tiny 16]")
    parser.add_argument("--workers", type=int, default=None, help="data-loader processes [default 1; --tiny 0]")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: robust on a shared 2-core machine, see the report)")
    parser.add_argument("--no-swa-ensemble", action="store_true",
                        help="skip the ensemble of the SWA-averaged members (10 recalibrations per seed)")
    parser.add_argument("--check-branching", action="store_true",
                        help="also train the plain and late-phase BN arms of the first seed unbranched and compare "
                             "bitwise [--tiny: on]")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: a few hundred images, K = 2, 4 epochs")
    parser.add_argument("--runs", default="/tmp/lpconvert-exp/runs")
    parser.add_argument("--out", default="zoo/results/cifar10_10k_scratch")
    parser.add_argument("--append", action="store_true", help="keep and skip the rows already in --out's JSON")
    args = parser.parse_args(argv)
    defaults = dict(train_subset=10000, val_subset=1000, eval_subset=None, batch_size=128, epochs=25, K=10,
                    workers=1, seeds=[0, 1, 2], t0_fraction=0.8, swa_fraction=0.8, swa_lr=0.02)
    for key, value in (TINY if args.tiny else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.check_branching = args.check_branching or args.tiny
    T0, swa_start = schedule_epochs(args)
    if not 0 < T0 < args.epochs:
        parser.error(f"T0 = {T0} must lie strictly between 0 and --epochs {args.epochs}")
    if not T0 <= swa_start < args.epochs:
        parser.error(f"SWA start {swa_start} must lie in [T0 = {T0}, {args.epochs}) (the arms branch at T0)")
    return args


def schedule_epochs(args: argparse.Namespace) -> tuple[int, int]:
    return round(args.t0_fraction * args.epochs), round(args.swa_fraction * args.epochs)


def common_settings(args: argparse.Namespace) -> dict:
    """Every FinetuneConfig field the arms share (the plain run of a seed up to T0 uses exactly these, K = 1)."""
    T0, _ = schedule_epochs(args)
    E = args.epochs
    return dict(
        model=args.model, pretrained=False, data=args.data, train_subset=args.train_subset,
        val_subset=args.val_subset, subset_seed=0, workers=args.workers, late_phase=("batchnorm",),
        sigma0=args.sigma0, t0=T0, epochs=E, batch_size=args.batch_size, optimizer="sgd", lr=args.lr, momentum=0.9,
        nesterov=True, weight_decay=5e-4, schedule="linear", anneal_start=0.5 * E, anneal_end=0.9 * E,
        lr_end=args.lr / 100, mode="sequential", select="last", bn_stats="fold", quiet=True, K=1,
    )


def arm_settings(arm: str, args: argparse.Namespace) -> dict:
    """What an arm changes after T0 (with the common settings, the complete FinetuneConfig of the arm)."""
    _, swa_start = schedule_epochs(args)
    settings: dict = dict(K=1)
    if arm in LATE:
        settings.update(K=args.K, gamma_theta=args.gamma_theta)
    if arm == "accumulation control":
        settings.update(accumulate=args.K, gamma_theta=args.gamma_theta)
    if arm in SWA:
        settings.update(swa_start=swa_start, swa_lr=args.swa_lr)
    return settings


def lr_at(args: argparse.Namespace, epoch: float) -> float:
    """The learning rate of the (non-SWA) schedule at `epoch`."""
    progress = min(max((epoch - 0.5 * args.epochs) / (0.4 * args.epochs), 0.0), 1.0)
    return args.lr * (1 - 0.99 * progress)


def slug(arm: str) -> str:
    return arm.replace(" + ", "_").replace(" ", "_").replace("-", "")


# --------------------------------------------------------------------------------------------------------------------
# training: the shared plain part once per seed, then every arm from a copy
# --------------------------------------------------------------------------------------------------------------------
def train_shared(seed: int, args: argparse.Namespace, log) -> Path:
    """The plain run of `seed` up to the end of epoch T0 (checkpointed, resumable); returns its directory."""
    T0, _ = schedule_epochs(args)
    seed_dir = Path(args.runs) / f"s{seed}"
    shared, marker = seed_dir / "shared", seed_dir / "shared.done.json"
    if marker.is_file():
        return shared
    settings = dict(common_settings(args), seed=seed, output=str(shared))
    stop = T0 * (args.train_subset // args.batch_size)  # Algorithm-1 iterations of T0 plain epochs
    resuming = (shared / "checkpoints" / "last.pt").is_file()
    config = FinetuneConfig(**settings, resume=str(shared)) if resuming else FinetuneConfig(**settings, force=True)
    log(f"seed {seed}: plain epochs 1..{T0} ({'resumed' if resuming else 'new'}) in {shared}")
    started = time.time()
    try:
        run(config, stop_after=stop)
    except RunInterrupted:
        pass
    else:
        raise RuntimeError(f"the shared run of seed {seed} did not stop at iteration {stop}")
    position = read_checkpoint(shared / "checkpoints" / "last.pt")["position"]
    if position["iteration"] != stop or position["epoch"] != T0 - 1:
        raise SystemExit(f"{shared} was interrupted at {position} before T0; rerun the same command to continue")
    marker.write_text(json.dumps({"T0": T0, "iterations": stop, "minutes": (time.time() - started) / 60}))
    return shared


def train_arm(arm: str, seed: int, shared: Path, args: argparse.Namespace, log) -> tuple[Path, float]:
    """The arm continued from a copy of the shared run (resumes an interrupted copy); returns (run dir, minutes)."""
    seed_dir = Path(args.runs) / f"s{seed}"
    arm_dir, marker = seed_dir / slug(arm), seed_dir / f"{slug(arm)}.done.json"
    if marker.is_file():
        return arm_dir, json.loads(marker.read_text())["minutes"]
    if not (arm_dir / "checkpoints" / "last.pt").is_file():
        shutil.rmtree(arm_dir, ignore_errors=True)
        partial = arm_dir.with_name(arm_dir.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(shared, partial)
        partial.rename(arm_dir)
    log(f"seed {seed}: {arm} from T0 in {arm_dir}")
    started = time.time()
    config = FinetuneConfig(**dict(common_settings(args), **arm_settings(arm, args), seed=seed),
                            resume=str(arm_dir), force=True)
    run(config, command=f"scripts/cifar10_10k_scratch.py arm {arm!r} seed {seed}")
    minutes = (time.time() - started) / 60
    marker.write_text(json.dumps({"minutes": minutes}))
    return arm_dir, minutes


def check_branching(arm: str, seed: int, branched: Path, args: argparse.Namespace, log) -> dict:
    """Train `arm` of `seed` in one go (``t0`` switching to K members, as a recipe does) and compare its final
    checkpoint with the branched run's, bitwise."""
    direct = Path(args.runs) / f"s{seed}" / f"{slug(arm)}_unbranched"
    log(f"seed {seed}: {arm}, unbranched, in {direct}")
    run(FinetuneConfig(**dict(common_settings(args), **arm_settings(arm, args), seed=seed), output=str(direct),
                       force=True))
    a = read_checkpoint(branched / "checkpoints" / "last.pt")
    b = read_checkpoint(direct / "checkpoints" / "last.pt")
    tensors = list(a["model"].items())
    theta_a, theta_b = a["engine"]["theta_optimizer"]["state"], b["engine"]["theta_optimizer"]["state"]
    tensors_equal = a["model"].keys() == b["model"].keys() and all(torch.equal(v, b["model"][k]) for k, v in tensors)
    momentum_equal = theta_a.keys() == theta_b.keys() and all(
        torch.equal(theta_a[i]["momentum_buffer"], theta_b[i]["momentum_buffer"]) for i in theta_a)
    return {"arm": arm, "seed": seed, "model_tensors": len(tensors),
            "identical": bool(tensors_equal and momentum_equal),
            "weights_identical": bool(tensors_equal), "momentum_identical": bool(momentum_equal)}


# --------------------------------------------------------------------------------------------------------------------
# evaluation on the full test set
# --------------------------------------------------------------------------------------------------------------------
def evaluate_arm(arm: str, arm_dir: Path, args: argparse.Namespace) -> list[dict]:
    """Rows of metrics: the averaged model, and for late-phase arms the non-averaged member ensemble."""
    common = dict(ood=[args.ood], subset=args.eval_subset, workers=args.workers, batch_size=256)
    if arm == "late-phase BN":
        rows = evaluate(str(arm_dir), args.data, ensemble=True, bn_stats="fold", checkpoint="last", **common)
    else:
        rows = evaluate(str(arm_dir / "model"), args.data, **common)
        if arm == "late-phase BN + SWA" and not args.no_swa_ensemble:
            rows.append(swa_member_ensemble(arm_dir, args))
    for row in rows:
        variant = row.pop("variant")
        if variant.startswith("ensemble"):
            row["eval"] = f"ensemble of {args.K} members" + (" (SWA)" if arm in SWA else "")
        elif arm in SWA:
            row["eval"] = "SWA average" + (" of the averaged members" if arm in LATE else "")
        else:
            row["eval"] = "averaged members (fold)" if arm in LATE else "model"
        row["ood_auroc"] = row.pop("auroc/test")
        row.pop("auroc/mean", None)
    return rows


def swa_member_ensemble(arm_dir: Path, args: argparse.Namespace) -> dict:
    """Mean softmax of the K SWA-averaged members, each with BatchNorm statistics re-estimated on the training subset
    (with the training augmentation, like the run's own collapse)."""
    import timm.data
    from torch.optim.swa_utils import AveragedModel
    from torch.utils.data import DataLoader

    from lpconvert.collapse import recalibrate_batch_norm, unload
    from lpconvert.data import build_datasets, resolve_data_dirs
    from lpconvert.evaluation import evaluate_model

    late, _ = load_late_phase(str(arm_dir), "last")
    state = read_checkpoint(arm_dir / "checkpoints" / "last.pt")
    swa = AveragedModel(late, use_buffers=False)
    swa.load_state_dict(state["swa"])
    model = swa.module
    config = timm.data.resolve_data_config(model=model)
    train_dir, test_dir = resolve_data_dirs(args.data)
    train, test = build_datasets(train_dir, test_dir, data_config=config, num_classes=10,
                                 train_subset=args.train_subset, val_subset=args.eval_subset, seed=0)
    _, ood = build_datasets(None, resolve_data_dirs(val_dir=args.ood)[1], data_config=config, num_classes=None,
                            val_subset=args.eval_subset)
    recal = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                       generator=torch.Generator().manual_seed(0))
    batches = state["config"]["recalibrate_batches"]
    members = [recalibrate_batch_norm(unload(model, k), recal, num_batches=batches).eval() for k in range(args.K)]

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float().softmax(-1) for m in members]).mean(0)

    loader = lambda ds: DataLoader(ds, batch_size=256, shuffle=False, num_workers=args.workers)  # noqa: E731
    metrics = evaluate_model(None, loader(test), device="cpu", ood_loaders={"test": loader(ood)}, predict_fn=predict)
    return {"variant": f"ensemble (K={args.K}, SWA members)", **{k: metrics[k] for k in ("top1", "top5", "nll", "ece")},
            "count": metrics["count"], "auroc/test": metrics["auroc/test"]}


def curve(run_dir: Path) -> list[dict]:
    """The run's per-epoch record (validation subset): epoch, K, lr, training loss, top-1."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in ("epoch", "K", "lr", "train_loss", "val_top1", "val_nll")} for r in rows]


# --------------------------------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = load_report(args) if args.append else new_report()
    report["setting"] = setting(args)
    check_runs_dir(args)
    report["invocations"].append({"command": command_line(argv), "minutes": 0.0, "hardware": hardware(args),
                                  "code": code_version(), "started": time.strftime("%Y-%m-%d %H:%M")})
    done = {(r["arm"], r["seed"]) for r in report["rows"]}
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def save() -> None:
        report["invocations"][-1]["minutes"] = (time.time() - started) / 60
        write_report(report, args)

    for seed in args.seeds:
        todo = [arm for arm in args.arms if (arm, seed) not in done]
        if not todo and not (args.check_branching and seed == args.seeds[0] and not report.get("branch_check")):
            continue
        shared = train_shared(seed, args, log)
        marker = json.loads((Path(args.runs) / f"s{seed}" / "shared.done.json").read_text())
        report["shared_minutes"][str(seed)] = marker["minutes"]
        for arm in todo:
            arm_dir, minutes = train_arm(arm, seed, shared, args, log)
            rows = evaluate_arm(arm, arm_dir, args)
            history = curve(arm_dir)
            for row in rows:
                report["rows"].append({"arm": arm, "seed": seed, **row, "train_minutes": minutes})
            report["curves"][f"{arm} / {seed}"] = history
            log(f"seed {seed}: {arm}: " + ", ".join(f"{r['eval']} {r['top1']:.2f}" for r in rows))
            save()
        if args.check_branching and seed == args.seeds[0] and not report.get("branch_check"):
            report["branch_check"] = []
            for arm in ("plain", "late-phase BN"):
                branched, _ = train_arm(arm, seed, shared, args, log)  # (already trained: returns at once)
                report["branch_check"].append(check_branching(arm, seed, branched, args, log))
                log(f"branching check: {report['branch_check'][-1]}")
            save()
    save()
    print(Path(args.out).with_suffix(".md").read_text())
    return report


def new_report() -> dict:
    return {"setting": {}, "invocations": [], "rows": [], "curves": {}, "shared_minutes": {}, "branch_check": None}


def setting(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTING}


def load_report(args: argparse.Namespace) -> dict:
    path = Path(args.out).with_suffix(".json")
    if not path.is_file():
        return new_report()
    report = json.loads(path.read_text())
    if report.get("setting") != setting(args):
        raise SystemExit(f"{path} holds runs with other settings ({report.get('setting')}, now {setting(args)}); "
                         "choose another --out or drop --append")
    return report


def check_runs_dir(args: argparse.Namespace) -> None:
    """--runs holds the run directories of ONE setting (they are resumed): refuse another setting's directory."""
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / "setting.json"
    ours = dict(setting(args), data=args.data)
    if path.is_file() and json.loads(path.read_text()) != ours:
        raise SystemExit(f"{runs} holds runs of another setting ({path}); choose another --runs")
    path.write_text(json.dumps(ours, indent=2))


def command_line(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    return "python scripts/cifar10_10k_scratch.py " + " ".join(shlex.quote(w) for w in words)


def hardware(args: argparse.Namespace) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores (shared), {args.threads} torch thread(s), {args.workers} loader worker(s)"


def code_version() -> dict:
    """The commit of the lpconvert that is imported (the frozen worktree for the long runs) and whether it is clean."""
    import lpconvert

    root = Path(lpconvert.__file__).resolve().parents[1]
    info = {"lpconvert": str(Path(lpconvert.__file__).resolve().parent)}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "lpconvert"],
                               capture_output=True, text=True, check=True).stdout.strip()
        info["lpconvert_clean"] = not dirty
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


# --------------------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------------------
def paired(report: dict, arm: str, base: str, evaluation: str, key: str) -> dict | None:
    """Per-seed differences arm − base (base evaluated as its averaged model), their 95 % interval and paired t-test
    (:func:`lpconvert.stats.paired_difference`)."""
    rows = report["rows"]
    first = {r["seed"]: r[key] for r in rows if r["arm"] == arm and r["eval"] == evaluation}
    second = {r["seed"]: r[key] for r in rows if r["arm"] == base and not r["eval"].startswith("ensemble")}
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    difference = paired_difference([second[s] for s in seeds], [first[s] for s in seeds])  # lpconvert compare's
    result = {"seeds": seeds, "diffs": [first[s] - second[s] for s in seeds], "mean": difference["mean"]}
    if len(seeds) > 1:
        result.update(sd=difference["std"], ci95=(difference["low"], difference["high"]), p=difference["p"])
    return result


def fmt(values: list[float], key: str) -> str:
    digits = 2 if key == "top1" else 4
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_report(report: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["comparisons"] = []
    evaluations = list(dict.fromkeys((r["arm"], r["eval"]) for r in report["rows"]))
    for arm, base in COMPARISONS:
        for arm_, evaluation in evaluations:
            if arm_ != arm:
                continue
            entry = {"arm": arm, "eval": evaluation, "baseline": base}
            entry.update({key: paired(report, arm, base, evaluation, key) for key in METRICS})
            if entry["top1"] is not None:
                report["comparisons"].append(entry)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out.with_suffix(".json"))

    T0, swa_start = schedule_epochs(args)
    E = args.epochs
    invocations = report["invocations"]
    code = invocations[-1]["code"]
    seeds = sorted({r["seed"] for r in report["rows"]})
    lines = [
        f"# CIFAR-10 from scratch on {args.train_subset:,} training images: late-phase BatchNorm, SWA, the control",
        "",
        f"Paper Table 15 analog (WRN-28-10, 10,000 images, 200 epochs: base 88.98 ± 0.18, late-phase BN 89.58 ± 0.19,"
        f" 5 seeds) at CPU size. Written {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{sum(i['minutes'] for i in invocations):.0f} min in all; lpconvert commit `{code.get('commit')}`"
        f"{'' if code.get('lpconvert_clean', True) else ' (with uncommitted changes in lpconvert/)'}. "
        "Commands (hardware, minutes):",
        "",
        "```bash",
        *(f"{i['command']}    # {i['hardware']}, {i['minutes']:.0f} min" for i in invocations),
        "```",
        "",
        f"**Setting.** `{args.model}` from random initialisation; a fixed stratified {args.train_subset:,}-image "
        "subset "
        "of the CIFAR-10 training set (subset seed 0: the same images in every arm and seed); "
        f"{E} epochs, batch {args.batch_size}, SGD Nesterov 0.9, weight decay 5e-4, lr {args.lr:g} held to epoch "
        f"{0.5 * E:g}, linear to {args.lr / 100:g} at epoch {0.9 * E:g}, constant after (the paper's 100/180/200). "
        f"Late phase from T0 = {T0} (lr there {lr_at(args, T0):.3g}): K = {args.K}, "
        f"σ0 = {args.sigma0:g}, γθ = {args.gamma_theta:g}, late-phase BatchNorm (classifier shared), members' "
        "weight decay 5e-4 like θ's; collapse: fold. "
        f"SWA arms: constant lr {args.swa_lr:g} from epoch {swa_start} (epochs {swa_start + 1}..{E} averaged, one "
        "snapshot per epoch), BatchNorm statistics re-estimated on the training subset (with augmentation) at the end. "
        f"Control (Table 10): K = 1 after T0, θ's gradient accumulated over {args.K} minibatches (γθ = "
        f"{args.gamma_theta:g}), BatchNorm stepping on every minibatch. The last epoch is reported (no selection). "
        f"Test: {'the 10,000' if args.eval_subset is None else f'{args.eval_subset:,} of the'} CIFAR-10 test images; "
        f"OOD: {'the 10,000' if args.eval_subset is None else f'{args.eval_subset:,} of the'} CIFAR-100 test images "
        f"(AUROC of the predictive entropy). Seeds {', '.join(map(str, seeds))}; mean ± std "
        "over seeds.",
        "",
        f"**Pairing.** Per seed the plain epochs 1..{T0} are trained once; every arm continues from a copy of that "
        "checkpoint, with the same data order and augmentation. "
        + branch_sentence(report.get("branch_check")),
        "",
        "| arm | evaluated as | top-1 % | NLL | ECE | OOD AUROC (CIFAR-100) | train min after T0 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for arm, evaluation in evaluations:
        rows = [r for r in report["rows"] if r["arm"] == arm and r["eval"] == evaluation]
        minutes = statistics.mean(r["train_minutes"] for r in rows)
        lines.append(f"| {arm} | {evaluation} | " + " | ".join(fmt([r[k] for r in rows], k) for k in METRICS)
                     + f" | {minutes:.0f} |")
    if report["shared_minutes"]:
        lines += ["", f"Plain epochs 1..{T0} (shared per seed): "
                  + ", ".join(f"seed {s}: {m:.0f} min" for s, m in report["shared_minutes"].items())
                  + ". Minutes are wall-clock on a shared machine (others' jobs ran alongside; the run may have been "
                    "paused): not a benchmark."]
    lines += ["", "## Paired differences (arm − baseline, same seed)", "",
              "Top-1 in points; 95 % interval and p-value from a paired t-test over seeds (t-distribution, "
              f"{max(len(seeds) - 1, 0)} degrees of freedom). The baseline is always its averaged model.", "",
              "| arm | evaluated as | − baseline | top-1 per seed | top-1 mean [95 % CI] | p | NLL | ECE "
              "| OOD AUROC |",
              "|---|---|---|---|---|---:|---:|---:|---:|"]
    for entry in report["comparisons"]:
        top1 = entry["top1"]
        per_seed = " / ".join(f"{d:+.2f}" for d in top1["diffs"])
        interval = f"{top1['mean']:+.2f}"
        if "ci95" in top1:
            interval += f" [{top1['ci95'][0]:+.2f}, {top1['ci95'][1]:+.2f}]"
        p = f"{top1['p']:.3f}" if "p" in top1 else "–"
        others = " | ".join(f"{entry[k]['mean']:+.4f}" for k in ("nll", "ece", "ood_auroc"))
        lines.append(f"| {entry['arm']} | {entry['eval']} | {entry['baseline']} | {per_seed} | {interval} | {p} | "
                     f"{others} |")
    lines += ["", "## Per seed (top-1 %)", "",
              "| arm | evaluated as | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|---|" + "---:|" * len(seeds)]
    for arm, evaluation in evaluations:
        by_seed = {r["seed"]: r["top1"] for r in report["rows"] if r["arm"] == arm and r["eval"] == evaluation}
        lines.append(f"| {arm} | {evaluation} | " + " | ".join(
            f"{by_seed[s]:.2f}" if s in by_seed else "–" for s in seeds) + " |")
    notes = ""
    md = out.with_suffix(".md")
    if md.is_file() and NOTES in md.read_text():
        notes = md.read_text().split(NOTES, 1)[1]
    md.write_text("\n".join(lines) + f"\n\n{NOTES}" + (notes if notes else "\n"))


def branch_sentence(checks: list[dict] | None) -> str:
    if not checks:
        return ("Branching is verified bitwise by `tests/test_cifar10_10k_scratch.py` (the `--tiny` mode: the "
                "branched plain and late-phase BN arms equal the same arms trained in one go).")
    return " ".join(
        f"Check (seed {c['seed']}): the branched {c['arm']} arm and the same arm trained in one go are "
        f"{'bitwise equal' if c['identical'] else 'NOT equal'} ({c['model_tensors']} model tensors and θ's "
        "momentum buffers)." for c in checks)


if __name__ == "__main__":
    main()
