"""The ``lpconvert`` command: a thin click layer over the Python API.

User errors (:class:`~lpconvert.errors.LatePhaseError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from .config import FinetuneConfig, read_recipe
from .errors import LatePhaseError
from .surgery import DEFAULT_TARGETS

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Group(click.Group):
    """Turns library errors into one line and exit code 2, interruptions into exit code 130."""

    def invoke(self, ctx: click.Context) -> Any:
        from .finetune import RunInterrupted

        try:
            return super().invoke(ctx)
        except LatePhaseError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except RunInterrupted as exc:
            click.echo(f"interrupted ({exc}); a checkpoint was saved: continue with --resume RUN_DIR", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lpconvert")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Late-phase weights (von Oswald et al., ICLR 2021) for pretrained timm / torchvision models.

    \b
    lpconvert inspect resnet50                    what would become late-phase
    lpconvert finetune resnet152 --data DIR       Algorithm 1 from the pretrained checkpoint
    lpconvert collapse RUN_DIR --out DIR          average the members into one model
    lpconvert push DIR --repo ORG/NAME            publish to the Hugging Face Hub
    lpconvert evaluate RUN_OR_MODEL --data DIR    the paper's metrics (accuracy, NLL, ECE, OOD AUROC)
    lpconvert demo                                the whole pipeline offline, in minutes on a CPU
    lpconvert zoo                                 recipes with the paper's settings and numbers
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


# --------------------------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@click.option("--K", "K", type=int, default=10, show_default=True, help="Late-phase members.")
@click.option("--late-phase", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="Kinds of late-phase weights: batchnorm, classifier, layernorm, groupnorm, rank1 (aliases bn, norm, head).")
@click.option("--include", multiple=True, help="Glob on qualified layer names to keep (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on qualified layer names to leave shared (repeatable).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights file for MODEL.")
@click.option("--num-classes", type=int, help="Replace the classifier with a new head of this size.")
@click.option("--list-layers", is_flag=True, help="Also list every layer that would be converted.")
def inspect(model: str, K: int, late_phase: str, include: tuple, exclude: tuple, weights: str | None,
            num_classes: int | None, list_layers: bool) -> None:
    """Report what `convert` would turn into late-phase layers (nothing is downloaded: random init)."""
    from . import load_model, plan

    net, _ = load_model(model, weights=weights, num_classes=num_classes, pretrained=False)
    report = plan(net, K, late_phase, include=include or None, exclude=exclude or None)
    click.echo(str(report))
    if list_layers:
        for name, kind in report.layers.items():
            click.echo(f"  {kind:<11} {name}")


# --------------------------------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------------------------------
_DEFAULTS = FinetuneConfig()
# flag, field, click type, help — the default shown is FinetuneConfig's (or the recipe's, which flags override)
_FINETUNE_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--weights", "weights", click.Path(dir_okay=False), "Local weights (.safetensors, or a state_dict loaded weights-only)."),
    ("--num-classes", "num_classes", int, "New classifier with this many classes (transfer)."),
    ("--pretrained/--no-pretrained", "pretrained", None, "Start from the hub's pretrained weights."),
    ("--data", "data", str, "Data root with train/ and val/ (folders or tar archives), or 'sklearn-digits'."),
    ("--train-dir", "train_dir", str, "Training ImageFolder tree or archive."),
    ("--val-dir", "val_dir", str, "Validation ImageFolder tree or archive."),
    ("--train-subset", "train_subset", int, "Use a stratified subset of this many training images."),
    ("--val-subset", "val_subset", int, "Use a stratified subset of this many validation images."),
    ("--subset-seed", "subset_seed", int, "Which stratified subsets (fixed across --seed, so seeds compare on the same images)."),
    ("--train-transform", "train_transform", click.Choice(["auto", "timm", "cifar"]), "Training augmentation."),
    ("--workers", "workers", int, "Data-loading worker processes."),
    ("--K", "K", int, "Late-phase members (1 = plain fine-tuning through the same pipeline)."),
    ("--late-phase", "late_phase", str, "Late-phase weights: batchnorm, classifier, layernorm, groupnorm, rank1."),
    ("--include", "include", str, "Comma-separated globs on layer names to convert."),
    ("--exclude", "exclude", str, "Comma-separated globs on layer names to keep shared."),
    ("--sigma0", "sigma0", float, "Member initialisation noise σ0 (Eq. 2)."),
    ("--gamma-theta", "gamma_theta", float, "γθ scaling the accumulated shared-weight gradient [default: 1/K]."),
    ("--t0", "t0", int, "Epoch at which late-phase training starts (plain training before)."),
    ("--accumulate", "accumulate", int, "With --K 1: θ accumulates over this many minibatches (Table 10 control)."),
    ("--epochs", "epochs", int, "Epochs."),
    ("--batch-size", "batch_size", int, "Global minibatch size per member step."),
    ("--optimizer", "optimizer", click.Choice(["sgd", "adam", "adamw"]), "U_θ."),
    ("--lr", "lr", float, "Learning rate of U_θ (and U_φ unless --member-lr)."),
    ("--momentum", "momentum", float, "SGD momentum."),
    ("--nesterov/--no-nesterov", "nesterov", None, "Nesterov momentum."),
    ("--weight-decay", "weight_decay", float, "Weight decay of U_θ (and U_φ unless --member-weight-decay)."),
    ("--member-optimizer", "member_optimizer", click.Choice(["sgd", "adam", "adamw"]), "U_φ [default: as U_θ]."),
    ("--member-lr", "member_lr", float, "Learning rate of U_φ [default: --lr]."),
    ("--member-weight-decay", "member_weight_decay", float, "Late-phase weight decay (paper, CIFAR: 5e-4·K)."),
    ("--schedule", "schedule", click.Choice(["multistep", "linear", "cosine", "constant"]), "Learning-rate schedule."),
    ("--milestones", "milestones", str, "Epochs (comma-separated, fractions allowed) where multistep scales the lr by --lr-gamma."),
    ("--lr-gamma", "lr_gamma", float, "Multistep factor."),
    ("--lr-end", "lr_end", float, "Final learning rate of the linear and cosine schedules."),
    ("--anneal-start", "anneal_start", float, "Linear schedule: epoch where annealing starts."),
    ("--anneal-end", "anneal_end", float, "Linear schedule: epoch where annealing ends [default: --epochs]."),
    ("--swa-start", "swa_start", int, "Epoch from which SWA averages the late-phase model (per epoch)."),
    ("--swa-lr", "swa_lr", float, "Constant learning rate during SWA."),
    ("--mode", "mode", click.Choice(["auto", "sequential", "vectorized"]), "Member execution (identical results)."),
    ("--group-size", "group_size", int, "Members per forward in vectorized mode [default: K]."),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N."),
    ("--amp", "amp", click.Choice(["auto", "bf16", "fp16", "off"]), "Autocast (auto: bf16 on GPU, off on CPU)."),
    ("--channels-last/--no-channels-last", "channels_last", None, "Memory format [default: on GPU]."),
    ("--compile/--no-compile", "compile", None, "torch.compile the model."),
    ("--sync-bn/--no-sync-bn", "sync_bn", None, "SyncBatchNorm across GPUs under torchrun."),
    ("--seed", "seed", int, "Seed of data order, augmentation and σ0 noise."),
    ("--output", "output", str, "Run directory [default: runs/MODEL-K<K>]."),
    ("--bn-stats", "bn_stats", click.Choice(["fold", "mean", "recalibrate"]), "BN statistics of the averaged model."),
    ("--recalibrate-batches", "recalibrate_batches", int, "Batches used by --bn-stats recalibrate."),
    ("--select", "select", click.Choice(["best", "last"]), "Which epoch's model is collapsed and written."),
    ("--checkpoint-every", "checkpoint_every", int, "Also checkpoint every N iterations (0: epoch ends only)."),
    ("--log-every", "log_every", int, "Progress update every N iterations (no host sync in between)."),
    ("--resume", "resume", click.Path(file_okay=False), "Continue the run in this directory exactly."),
    ("--force/--no-force", "force", None, "Overwrite a non-empty output, or resume with changed settings."),
    ("--quiet/--no-quiet", "quiet", None, "No progress bar; per-epoch log lines only."),
    ("--push-to-hub", "push_to_hub", str, "Push the collapsed model to this Hub repo (ORG/NAME) at the end."),
    ("--allow-regression/--no-allow-regression", "allow_regression", None, "Push even if worse than the start."),
]


def _finetune_options(function):
    for flag, name, kind, help_text in reversed(_FINETUNE_OPTIONS):
        default = getattr(_DEFAULTS, name)
        shown = help_text if "[default:" in help_text else f"{help_text}  [default: {_show(default)}]"
        decls = [flag, name] if not flag.startswith("--K") else [flag, "K"]
        if kind is None:  # boolean --x/--no-x
            function = click.option(*decls, default=None, help=shown)(function)
        else:
            function = click.option(*decls, type=kind, default=None, help=shown)(function)
    return function


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def build_config(model: str | None, recipe: str | None, flags: dict[str, Any]) -> FinetuneConfig:
    """Defaults ← recipe file (or, for a bare --resume, the run's own settings) ← flags given on the command line."""
    values: dict[str, Any] = read_recipe(recipe) if recipe else {}
    saved = Path(flags["resume"]) / "config.json" if flags.get("resume") else None
    if model is None and recipe is None and saved is not None and saved.is_file():
        values = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("resume", "force")}
    if model is not None:
        values["model"] = model
    if "model" not in values:
        raise LatePhaseError("no MODEL given; name one (e.g. resnet152, tv:resnet50, hf-hub:ORG/NAME) or use --recipe")
    values.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(values.get("milestones"), str):
        values["milestones"] = _parse_milestones(values["milestones"])
    return FinetuneConfig.from_dict(values).validate()


def _parse_milestones(text: str) -> tuple[float, ...]:
    try:
        epochs = [float(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise LatePhaseError(f"--milestones takes comma-separated epochs such as 10,15 or 0.5; got {text!r}") from None
    return tuple(int(e) if e.is_integer() else e for e in epochs)


@main.command()
@click.argument("model", required=False)
@click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe file (YAML/TOML, e.g. zoo/*.yaml); flags override it.")
@click.option("--baseline", is_flag=True, help="Plain fine-tuning (K=1) through the identical pipeline.")
@_finetune_options
def finetune(model: str | None, recipe: str | None, baseline: bool, **flags: Any) -> None:
    """Fine-tune MODEL with late-phase weights (Algorithm 1) and write the averaged model.

    \b
    MODEL: a timm name (resnet152, resnet152.tv_in1k), tv:NAME (torchvision), hf-hub:ORG/NAME,
    local-dir:DIR, or a registered lpconvert model (cifar_resnet20, digits_cnn) with --weights.
    Defaults are the paper's ImageNet recipe; many GPUs: torchrun --nproc_per_node N -m lpconvert finetune ...
    """
    from .finetune import finetune_command, run

    if baseline:
        flags["K"] = 1
    config = build_config(model, recipe, flags)
    report = run(config, command=finetune_command())
    if report:
        click.echo(_report_table(report))


def _report_table(report: dict[str, Any]) -> str:
    what = "plain fine-tuning" if report["K"] == 1 else f"late-phase K={report['K']}"
    return "\n".join([
        f"start checkpoint            top-1 {report['start_top1']:6.2f}",
        f"{what:<27} top-1 {report['final_top1']:6.2f}   (epoch {report['epoch']}, {report['select']}, "
        f"bn_stats={report['bn_stats']})",
        f"change                      {report['change']:+6.2f}",
        f"averaged model: {report['model_dir']}",
    ])


# --------------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--output", default="runs/demo", show_default=True, help="Where the demo writes its three runs.")
@click.option("--K", "K", default=4, show_default=True, help="Late-phase members.")
@click.option("--seeds", default=3, show_default=True, help="Fine-tuning runs per arm (seeds 0, 1, …).")
@click.option("--force", is_flag=True, help="Overwrite an existing demo output.")
def demo(output: str, K: int, seeds: int, force: bool) -> None:
    """The whole pipeline offline on real images (scikit-learn's handwritten digits), in minutes on a CPU.

    Trains a small BatchNorm CNN to a 'pretrained' state (T0), then fine-tunes it late-phase and plain side by
    side through `finetune` (several seeds), collapses, evaluates and saves safetensors.
    """
    from .demo import run_demo

    click.echo(run_demo(Path(output), K=K, seeds=seeds, force=force))


@main.command("evaluate")
@click.argument("source")
@click.option("--data", required=True, help="Dataset root (its val/ or test/ split is used) or one ImageFolder tree/archive.")
@click.option("--ood", multiple=True, help="Out-of-distribution set (tree or archive), repeatable: AUROC per set + mean.")
@click.option("--ensemble", is_flag=True, help="Late-phase run: also the non-averaged ensemble (mean of member softmax).")
@click.option("--bn-stats", type=click.Choice(["fold", "mean", "recalibrate", "all"]),
              help="Late-phase run: collapse mode(s) to evaluate [default: the run's]; recalibrate uses train/ with "
                   "the training augmentation.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Late-phase run: which checkpoint.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights for a model spec.")
@click.option("--subset", type=int, help="Evaluate a stratified subset of this many images.")
@click.option("--flatness", default="", help="Comma-separated σz for the flatness score δL(σz) (paper Fig. 3).")
@click.option("--flatness-draws", default=10, show_default=True, help="Noise draws per σz.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", default=4, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (GPU when there is one), cpu, cuda, cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the rows as CSV.")
def evaluate_command(source: str, data: str, ood: tuple, ensemble: bool, bn_stats: str | None, checkpoint: str,
                     weights: str | None,
                     subset: int | None, flatness: str, flatness_draws: int, batch_size: int, workers: int,
                     device: str, json_path: str | None, csv_path: str | None) -> None:
    """Top-1/top-5, NLL, ECE and OOD AUROC of SOURCE: a model spec, an output directory or a late-phase run."""
    from .files import atomic_write_bytes
    from .evaluate import evaluate, format_table, to_csv, to_json

    sigmas = [float(v) for v in flatness.split(",") if v.strip()]
    rows = evaluate(source, data, ood=ood, ensemble=ensemble, bn_stats=bn_stats, checkpoint=checkpoint,
                    weights=weights, subset=subset,
                    batch_size=batch_size, workers=workers, device=device, flatness_sigmas=sigmas,
                    flatness_draws=flatness_draws)
    click.echo(format_table(rows))
    if json_path:
        atomic_write_bytes(json_path, to_json(rows).encode())
    if csv_path:
        atomic_write_bytes(csv_path, to_csv(rows).encode())


@main.command()
def zoo() -> None:
    """List the recipes of zoo/ with the paper's numbers; run one with `lpconvert finetune --recipe FILE`."""
    from .config import list_recipes

    for recipe in list_recipes():
        paper = recipe["paper"] or {}
        numbers = " → ".join(f"{k} {v}" for k, v in paper.items()) or "no paper numbers"
        click.echo(f"{recipe['name']}\n  {recipe['file']}\n  paper: {numbers}; measured: {recipe['measured'] or '—'}")
        click.echo(f"  {recipe['description']}")


# --------------------------------------------------------------------------------------------------------------------
# collapse / push
# --------------------------------------------------------------------------------------------------------------------
@main.command("collapse")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--bn-stats", type=click.Choice(["fold", "mean", "recalibrate"]), default="fold", show_default=True,
              help="BN statistics of the averaged model (recalibrate needs --data).")
@click.option("--data", help="Data root or training folder for --bn-stats recalibrate.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of a run directory.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def collapse_command(source: str, out: str, bn_stats: str, data: str | None, checkpoint: str, force: bool) -> None:
    """Average the members of a late-phase run or checkpoint into one model of the original architecture."""
    from .finetune import collapse_run

    path = collapse_run(source, out, bn_stats=bn_stats, data=data, which=checkpoint, force=force)
    click.echo(f"collapsed model written to {path}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, help="Hub repository ORG/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", help="Branch to push to.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--endpoint", help="Hub endpoint [default: HF_ENDPOINT or huggingface.co].")
@click.option("--token", help="Hub token [default: HF_TOKEN or your login].")
@click.option("--allow-regression", is_flag=True, help="Publish even if the model is worse than its base checkpoint.")
def push(folder: str, repo: str, private: bool, revision: str | None, create_pr: bool, endpoint: str | None,
         token: str | None, allow_regression: bool) -> None:
    """Publish a collapsed model directory to the Hugging Face Hub in one commit."""
    from .hub import push as push_folder

    url = push_folder(folder, repo, token=token, endpoint=endpoint, private=private, revision=revision,
                      create_pr=create_pr, allow_regression=allow_regression)
    click.echo(f"pushed {folder} to {repo}: {url}")

