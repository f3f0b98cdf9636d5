"""The ``lpconvert`` command: a thin click layer over the Python API.

Every failure a user can cause or meet is one line on stderr: exit code 2 for user errors (bad input, a folder that
is not lpconvert's, a full or read-only disk…), 130 after an interrupt (a checkpoint was saved), 1 for an internal
error. ``--debug`` (or ``LPCONVERT_DEBUG=1``) shows the traceback instead. Lists of names or numbers are
comma-separated (``--late-phase bn,classifier``, ``--include 'layer4.*,fc'``); paths repeat the flag (``--ood``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from lpconvert.cli_settings import (
    FLAG_SETTINGS,
    MODEL_OPTION,
    build_config,
    config_options,
    given_settings,
    model_argument,
    names,
)
from lpconvert.collapse.soup import SOUPS
from lpconvert.config import SELECT, FinetuneConfig
from lpconvert.errors import LatePhaseError, os_error_message, user_message
from lpconvert.layers import BN_STATS_MODES
from lpconvert.run.folder import exported_checkpoint

EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


class _Group(click.Group):
    """Turns failures into one line (exit 2 for user errors, 130 for interruptions, 1 for bugs) unless --debug."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """click's own usage errors (an unknown flag, a value out of range) as one line too."""
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else None
            hint = f"; see `{where} --help`" if where else ""
            click.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            if not standalone_mode:
                raise
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result

    def invoke(self, ctx: click.Context) -> Any:
        from lpconvert.train.finetune import RunInterrupted

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if _debug(ctx):
                raise
            if isinstance(exc, RunInterrupted):
                saved = "a checkpoint was saved" if exc.saved else "no checkpoint yet"
                click.echo(f"interrupted ({exc}); {saved}: continue with {exc.how}", err=True)
                ctx.exit(EXIT_INTERRUPTED)
            if isinstance(exc, LatePhaseError):
                from lpconvert.data.labels import ClassCountError

                message = exc.for_command(ctx.invoked_subcommand) if isinstance(exc, ClassCountError) else None
                click.echo(f"error: {message or user_message(exc)}", err=True)
                ctx.exit(EXIT_USAGE)
            if isinstance(exc, OSError):
                click.echo(f"error: {os_error_message(exc)}", err=True)
                ctx.exit(EXIT_USAGE)
            click.echo(f"error: internal error ({type(exc).__name__}: {user_message(LatePhaseError(str(exc)))}); "
                       "rerun with --debug for the traceback and report it", err=True)
            ctx.exit(EXIT_INTERNAL)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("LPCONVERT_DEBUG", "") not in ("", "0")


@click.group("lpconvert", cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lpconvert")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, including the libraries' own messages.")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (also LPCONVERT_DEBUG=1).")
def main(verbose: bool, debug: bool) -> None:
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
    _configure_logging(verbose)


def _configure_logging(verbose: bool) -> None:
    """lpconvert's own progress at INFO; third-party chatter (httpx requests, matplotlib's font cache) only with
    --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", force=True)
    logging.getLogger("lpconvert").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("httpx", "httpx2", "huggingface_hub", "matplotlib"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


# --------------------------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@config_options("K", "late_phase", "late_phase_options", "include", "exclude", "weights", "num_classes")
@click.option("--list-layers", is_flag=True, help="Also list every layer that would be converted.")
def inspect(model: str, list_layers: bool, **flags: Any) -> None:
    """Report what `finetune` would turn into late-phase layers (random init unless --weights: nothing downloaded)."""
    from lpconvert.convert.surgery import plan_or_refuse
    from lpconvert.publish.loading import load_model

    config = FinetuneConfig.from_dict({"model": model, **given_settings(flags)})
    net, _ = load_model(config.model, weights=config.weights, num_classes=config.num_classes, pretrained=False)
    report = plan_or_refuse(net, config.K, config.late_phase, include=config.include or None,
                            exclude=config.exclude or None, options=config.kind_options())
    click.echo(str(report))
    if list_layers:
        for name, kind in report.layers.items():
            click.echo(f"  {kind:<11} {name}")


# --------------------------------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("model", required=False)
@MODEL_OPTION
@click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe file (YAML/TOML, e.g. zoo/*.yaml); flags override it.")
@click.option("--baseline", is_flag=True, help="Plain fine-tuning (K=1) through the identical pipeline.")
@config_options(*FLAG_SETTINGS)
def finetune(model: str | None, model_option: str | None, recipe: str | None, baseline: bool, **flags: Any) -> None:
    """Fine-tune MODEL with late-phase weights (Algorithm 1) and write the averaged model.

    \b
    MODEL: a timm name (resnet152, resnet152.tv_in1k), tv:NAME (torchvision), hf-hub:ORG/NAME,
    local-dir:DIR, or a registered lpconvert model (cifar_resnet20, digits_cnn) with --weights.
    Defaults are the paper's ImageNet recipe; many GPUs: torchrun --nproc_per_node N -m lpconvert finetune ...
    """
    from lpconvert.train.finetune import finetune_command, run

    if baseline:
        flags["K"] = 1
    flags["include"], flags["exclude"] = names(flags["include"]) or None, names(flags["exclude"]) or None
    config = build_config(model_argument(model, model_option), recipe, flags)
    report = run(config, command=finetune_command())
    if report:
        click.echo(_report_table(report))


def _report_table(report: dict[str, Any]) -> str:
    """The run's result, the verdict first: did the checkpoint get better — on the validation set the epoch was chosen
    on, and on the test set measured once when validation was held out of the training images."""
    run_K = report.get("run_K", report["K"])
    what = "plain fine-tuning" if run_K == 1 else f"late-phase K={run_K}"
    on = {"held-out": "validation (held out of train)", "test": "test set (nothing selected on it)"}.get(
        report.get("validation"), "validation")
    exported = f"epoch {report['epoch']}, {report['select']}, bn_stats={report['bn_stats']}"
    if report["epoch"] == 0:
        exported = "epoch 0: the start, unchanged"
    elif report["K"] != run_K:
        exported += ", the plain model before T0"
    change = report.get("test_top1", report["final_top1"]) - report.get("start_test_top1", report["start_top1"])
    where = "test set" if "test_top1" in report else on.split(" (")[0]
    if report["epoch"] == 0:
        verdict = "your checkpoint did not get better: no epoch beat it on the validation set, it is exported unchanged"
    else:
        verdict = (f"{where} top-1 {change:+.2f} points against your checkpoint (one run: no interval over seeds; "
                   "`lpconvert compare` measures one)")
    lines = [f"verdict: {verdict}", f"top-1 on the {on}",
             f"  start checkpoint          {report['start_top1']:6.2f}",
             f"  {what:<25} {report['final_top1']:6.2f}   ({exported})",
             f"  change                    {report['change']:+6.2f}"]
    if "test_top1" in report:
        lines += ["top-1 on the test set (measured once, nothing chosen on it)",
                  f"  start checkpoint          {report['start_test_top1']:6.2f}",
                  f"  exported model            {report['test_top1']:6.2f}",
                  f"  change                    {report['test_top1'] - report['start_test_top1']:+6.2f}"]
    lines += [*([f"note: {report['note']}"] if report.get("note") else []), f"averaged model: {report['model_dir']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------------------------
def _compare_settings() -> tuple[str, ...]:
    from lpconvert.compare.plan import NOT_PER_ARM

    return tuple(name for name in FLAG_SETTINGS if name not in NOT_PER_ARM)


@main.command()
@click.argument("model", required=False)
@MODEL_OPTION
@click.option("--recipe", type=click.Path(dir_okay=False), help="Base settings from a recipe file; flags override it.")
@click.option("--arm", "arms", multiple=True, required=True,
              help="An arm, repeatable (two or more): 'NAME: SETTING=VALUE ...' over the base settings, e.g. "
                   "--arm 'plain: K=1' --arm 'late: K=10 sigma0=0.5'; a bare NAME is the base settings, except "
                   "'plain', which means K=1. Two arms with the same settings are refused. The first arm is the "
                   "reference.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Comma-separated seeds; each seed pairs the arms.")
@click.option("--ood", multiple=True, help="Out-of-distribution set (tree or archive), repeatable: AUROC per set + mean.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="The comparison's folder (new, or this same comparison to continue it).")
@click.option("--selection-split", type=float, default=0.0, show_default=True,
              help="Divide the evaluation split once (stratified, --subset-seed) into this fraction to choose on "
                   "and the rest to report on; then every arm is also reported as the greedy soup of its members "
                   "and interpolated with the start (α chosen on that fraction). For a checkpoint that has seen "
                   "every training image, whose held-out training images cannot select.")
@config_options(*_compare_settings())
def compare(model: str | None, model_option: str | None, recipe: str | None, arms: tuple[str, ...], seeds: str,
            ood: tuple[str, ...], output: str, selection_split: float, **flags: Any) -> None:
    """Does late-phase training beat plain fine-tuning on MODEL and its data, by more than the seed noise?

    \b
    Trains every arm with every seed: per seed the epochs before --t0 once, each arm branching from them (same data
    order and augmentation); every arm at its last epoch, evaluated on the data's evaluation split (val/, or test/
    when there is none: nothing is chosen on it) as its averaged model and, for late-phase arms, the members'
    ensemble; the starting checkpoint is evaluated the same way. Writes OUTPUT/report.json, report.md, report.png:
    first the verdict against the start, then per-seed values, mean ± std and paired differences (95 % interval,
    p-value). Rerun the same command to continue (display flags such as --quiet or -j may change), or to add seeds.
    """
    from lpconvert.compare.command import run_comparison
    from lpconvert.compare.plan import parse_arm, plan_comparison
    from lpconvert.compare.report import to_markdown

    flags["include"], flags["exclude"] = names(flags["include"]) or None, names(flags["exclude"]) or None
    base = build_config(model_argument(model, model_option), recipe, flags)
    try:
        seed_list = [int(s) for s in names(seeds)]
    except ValueError:
        raise LatePhaseError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    comparison = plan_comparison(base, [parse_arm(a) for a in arms], seed_list, output, ood, selection_split)
    click.echo(to_markdown(run_comparison(comparison)))


# --------------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--output", default="runs/demo", show_default=True, help="Where the demo writes its three runs.")
@click.option("--K", "K", type=click.IntRange(min=2), default=4, show_default=True, help="Late-phase members.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fine-tuning runs per arm (seeds 0, 1, …).")
@click.option("--force", is_flag=True, help="Replace an earlier demo folder (only that), once the new demo is done.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="CPU threads (results are bit-identical for a fixed count); 0: finetune's default, which follows "
                   "the CPUs and the load.")
def demo(output: str, K: int, seeds: int, force: bool, threads: int) -> None:
    """The whole pipeline offline on real images (scikit-learn's handwritten digits), in minutes on a CPU.

    Trains a small BatchNorm CNN to a 'pretrained' state (T0), then fine-tunes it late-phase and plain side by
    side through `finetune` (several seeds), collapses, evaluates and saves safetensors.
    """
    from lpconvert.demo import run_demo

    click.echo(run_demo(Path(output), K=K, seeds=seeds, force=force, threads=threads or None))


from lpconvert.evaluate.options import robustness_options  # noqa: E402 - the corruption and calibration flags of evaluate


@main.command("evaluate")
@click.argument("source")
@click.option("--data", help="Dataset root (its val/, validation/ or test/ split is used) or one ImageFolder "
                             "tree/archive; or give --dataset.")
@click.option("--dataset", help="A Hugging Face dataset, hfds/NAME (its validation split), instead of --data.")
@click.option("--ood", multiple=True, metavar="[NAME=]PATH",
              help="Out-of-distribution set (tree, root or archive), repeatable: AUROC per set and their mean, with "
                   "the predictive-entropy score (auroc/NAME) and the maximum softmax probability (auroc_msp/NAME). "
                   "NAME defaults to the file or folder name, or the folder above a split's name "
                   "(data/cifar100/test.tar.gz -> cifar100); sets whose names collide get -2, -3.")
@click.option("--ensemble", is_flag=True, help="Late-phase run: also the non-averaged ensemble (mean of member softmax).")
@click.option("--bn-stats", type=click.Choice([*BN_STATS_MODES, "all"]),
              help="Late-phase run: collapse mode(s) to evaluate [default: the run's]; recalibrate re-estimates the "
                   "statistics on the train/ split exactly as the run does.")
@click.option("--checkpoint", type=click.Choice(SELECT),
              help="Late-phase run: which checkpoint [default: the one the run exported].")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights for a model spec.")
@click.option("--subset", type=click.IntRange(min=1), help="Evaluate a stratified subset of this many images.")
@robustness_options
@click.option("--flatness", default="", help="Comma-separated σz for the flatness score δL(σz) (paper Fig. 3).")
@click.option("--flatness-draws", type=click.IntRange(min=1), default=10, show_default=True,
              help="Noise draws per σz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per evaluation batch.")
@click.option("-j", "--workers", type=click.IntRange(min=0),
              help="Data-loading (and corrupting) worker processes [default: one less than the CPUs this process may "
                   "use, shared among torchrun's processes, at most 4].")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for the model [default: torch's; under torchrun, each process's share of the CPUs].")
@click.option("--device", default="auto", show_default=True, help="auto (GPU when there is one), cpu, cuda, cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows as JSON (every key).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the rows as CSV (every key).")
def evaluate_command(source: str, data: str | None, dataset: str | None, ood: tuple, ensemble: bool,
                     bn_stats: str | None, checkpoint: str | None, weights: str | None, subset: int | None, flatness: str,
                     flatness_draws: int, batch_size: int, workers: int | None, threads: int | None, device: str,
                     json_path: str | None, csv_path: str | None, **robustness: Any) -> None:
    """Top-1/top-5, NLL, ECE, Brier and OOD AUROC of SOURCE: a model spec, an output directory or a late-phase run;
    optionally accuracy under corruptions (mCE) and calibration after temperature scaling on held-out images.

    Runs sharded under torchrun (`torchrun --nproc_per_node N -m lpconvert evaluate ...`): every process evaluates its
    share of every set, the numbers are one process's, and rank 0 alone prints and writes.
    """
    from lpconvert.evaluate.command import evaluate, format_table, to_csv, to_json
    from lpconvert.evaluate.options import robustness_arguments
    from lpconvert.files import atomic_write_bytes

    try:
        sigmas = [float(v) for v in names(flatness)]
    except ValueError:
        raise LatePhaseError(f"--flatness takes comma-separated numbers such as 0.05,0.1, got {flatness!r}") from None
    rows = evaluate(source, data, dataset=dataset, ood=ood, ensemble=ensemble, bn_stats=bn_stats,
                    checkpoint=checkpoint or exported_checkpoint(source),
                    weights=weights, subset=subset, batch_size=batch_size, workers=workers, threads=threads,
                    device=device, flatness_sigmas=sigmas, flatness_draws=flatness_draws,
                    **robustness_arguments(robustness))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank has the rows; rank 0 reports them
        return
    source_note = f"from {robustness['corruption_dir']}" if robustness["corruption_dir"] else \
        "generated, ImageNet-C severities"
    click.echo(format_table(rows, corruption_source=source_note))
    if json_path:
        atomic_write_bytes(json_path, to_json(rows).encode())
    if csv_path:
        atomic_write_bytes(csv_path, to_csv(rows).encode())


@main.command()
def zoo() -> None:
    """List the recipes of zoo/ with the paper's numbers and lpconvert's (those of zoo/README.md); run one with
    `lpconvert finetune --recipe FILE`."""
    from lpconvert.zoo import describe_recipe, list_recipes

    click.echo("\n".join(describe_recipe(recipe) for recipe in list_recipes()))


# --------------------------------------------------------------------------------------------------------------------
# collapse / push
# --------------------------------------------------------------------------------------------------------------------
@main.command("collapse")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--bn-stats", type=click.Choice(BN_STATS_MODES), default=FinetuneConfig.__dataclass_fields__['bn_stats'].default, show_default=True,
              help="BN statistics of the averaged model (recalibrate needs --data).")
@click.option("--data", help="Data root, training folder or hfds/NAME for --bn-stats recalibrate (and where --soup "
                             "greedy / --interpolate auto find the run's validation images) [default: the run's].")
@click.option("--checkpoint", type=click.Choice(SELECT),
              help="Which checkpoint of a run directory [default: the one the run exported].")
@click.option("--soup", type=click.Choice(SOUPS), default="uniform", show_default=True,
              help="Average all members (uniform, Eq. 1), or the members a greedy soup keeps on the run's validation "
                   "set.")
@click.option("--interpolate", metavar="ALPHA|auto",
              help="Interpolate with the run's starting model: (1 − α) θ_start + α θ_averaged, α in [0, 1], or auto "
                   "(the best of 0, 0.1, …, 1 on the run's validation set).")
@click.option("--force", is_flag=True, help="Replace an lpconvert model folder at --out (only that).")
def collapse_command(source: str, out: str, bn_stats: str, data: str | None, checkpoint: str | None, soup: str,
                     interpolate: str | None, force: bool) -> None:
    """Average the members of a late-phase run or checkpoint into one model of the original architecture."""
    from lpconvert.collapse.command import collapse_run
    from lpconvert.train.finetune import finetune_command

    path = collapse_run(source, out, bn_stats=bn_stats, data=data, which=checkpoint or exported_checkpoint(source),
                        force=force,
                        command=finetune_command(), soup=soup, interpolate=interpolate)
    if soup != "uniform" or interpolate is not None:
        from lpconvert.collapse.soup import describe
        from lpconvert.files import PROVENANCE_NAME, read_json_object

        click.echo(f"averaging: {describe(read_json_object(path / PROVENANCE_NAME)['averaging'].get('selection'))}")
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
    from lpconvert.publish.hub import push as push_folder

    url = push_folder(folder, repo, token=token, endpoint=endpoint, private=private, revision=revision,
                      create_pr=create_pr, allow_regression=allow_regression)
    click.echo(f"pushed {folder} to {repo}: {url}")

