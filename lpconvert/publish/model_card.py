"""What an lpconvert output directory holds, and its model card.

The card (README.md) has YAML front matter for the Hub, made with huggingface_hub's ``ModelCardData``: library,
license, tags, ``base_model`` with ``base_model_relation: finetune``, the training ``datasets`` (Hub ids) and a
``model-index`` (``EvalResult``) with this model's validation top-1 and top-5, which the Hub shows on the model page.
The text has the method in one paragraph with the paper citation, the loading snippet with the preprocessing the
numbers were measured with, every hyper-parameter and the measured metrics — numbers only from the run, base
checkpoint beside this model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCardData

from lpconvert.files import PROVENANCE_NAME, WEIGHTS_NAME
from lpconvert.models import is_lpconvert_architecture
from lpconvert.train.tensorboard import MODEL_LOGS

if TYPE_CHECKING:
    from lpconvert.publish.loading import ModelSource


#: Placeholder for the Hub repository in the model card's loading snippet; ``lpconvert push`` fills it in.
REPO_ID_PLACEHOLDER = "<namespace>/<model-name>"

PAPER_CITATION = (
    "Johannes von Oswald, Seijin Kobayashi, Alexander Meulemans, Christian Henning, Benjamin F. Grewe and "
    "João Sacramento. *Neural networks with late-phase weights.* ICLR 2021. "
    "[arXiv:2007.12927](https://arxiv.org/abs/2007.12927)"
)
PAPER_BIBTEX = """@inproceedings{vonoswald2021latephase,
  title     = {Neural networks with late-phase weights},
  author    = {von Oswald, Johannes and Kobayashi, Seijin and Meulemans, Alexander and Henning, Christian
               and Grewe, Benjamin F. and Sacramento, Jo{\\~a}o},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://arxiv.org/abs/2007.12927}
}"""


#: The evaluation table's columns, in order (any other metric follows under its own name).
_METRIC_LABELS = {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "nll": "NLL", "ece": "ECE"}
#: Metrics in percent of the images: one image of N resolves 100/N %.
_PERCENT_METRICS = ("top1", "top5")
#: Decimals of every other metric (NLL, ECE, AUROC …).
_OTHER_DECIMALS = 4
#: The model-index entries: the metric, its Hub metric type and its name on the model page (values in percent).
_EVAL_METRICS = (("top1", "accuracy", "Top-1 accuracy"), ("top5", "top_5_accuracy", "Top-5 accuracy"))
#: The evaluations a card reports: the row's label, the ``metrics`` key of its numbers and of the set it was measured
#: on (the test set takes the validation set's ``type`` and ``name`` unless it has its own).
_EVALUATIONS = (("base checkpoint", "base", "dataset"), ("this model", "final", "dataset"),
                ("base checkpoint", "base_test", "test_dataset"), ("this model", "test", "test_dataset"))
_BN_STATS_TEXT = {
    "fold": "BatchNorm: the running statistics are the members' mean statistics, and scale and shift are solved so "
            "that in eval mode every BatchNorm outputs exactly the average of its members' outputs. In train mode it "
            "normalises with batch statistics like any BatchNorm, so the checkpoint can be fine-tuned further, "
            "pruned or frozen like the base model.",
    "mean": "BatchNorm: scale, shift and running statistics are the members' means.",
    "recalibrate": "BatchNorm: scale and shift are the members' means; the running statistics were re-estimated "
                   "with a pass over augmented training images.",
}


def render_model_card(
    source: ModelSource,
    *,
    metrics: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    averaging: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    logs: bool = False,
    repo_id: str = REPO_ID_PLACEHOLDER,
) -> str:
    """Markdown model card with YAML front matter; numbers come only from ``metrics`` and ``hparams``.

    ``averaging`` says how the checkpoint was made (``K``, ``late_phase``, ``bn_stats``, ``epoch``, ``select``,
    ``swa_start``, ``training_data``, ``sigma0``); ``datasets`` are the Hub ids of the training data;
    ``metrics["dataset"]`` (``type``: a Hub dataset id or a name, ``name``, ``split``, ``num_images``) names the set
    ``metrics["base"]`` and ``["final"]`` were measured on, which the ``model-index`` needs, and
    ``metrics["test_dataset"]`` the set of ``metrics["test"]`` when given (:func:`evaluations`); every number is
    rounded to what it resolves (:func:`round_metric`); ``logs``: the folder holds the run's TensorBoard logs
    (:data:`MODEL_LOGS`)."""
    unchanged = is_the_start(averaging)
    plain = bool(averaging) and averaging.get("run_K", averaging.get("K")) == 1
    what = "fine-tuned without late-phase weights (K = 1)" if plain else "with late-phase weights"
    title = f"{source.architecture}: the starting checkpoint, unchanged" if unchanged else f"{source.architecture} {what}"
    results = _eval_results(metrics)
    meta = ModelCardData(
        library_name="timm" if source.library == "timm" else "pytorch",
        license=str(source.license).lower() if source.license else None,
        tags=["image-classification", "late-phase-weights", source.library, "lpconvert"],
        pipeline_tag="image-classification",
        base_model=source.base_model,
        base_model_relation="finetune" if source.base_model else None,
        datasets=list(datasets) or None,
        model_name=title if results else None,
        eval_results=results or None,
    )
    base = f"`{source.base_model or (Path(source.spec).name if source.origin == 'local-dir' else source.spec)}`"
    if source.weights:
        base += f" with weights from `{Path(source.weights).name}`"
    elif not source.pretrained:
        base += " (random initialisation)"
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {title}",
        "",
        *_verdict(metrics, averaging),
        _unchanged_paragraph(source, base, averaging) if unchanged else _method_paragraph(source, base, averaging),
        "",
        f"Paper: {PAPER_CITATION}",
        "",
        "## What this checkpoint is",
        "",
        *_what_it_is(source, averaging),
        "",
        "## How to load",
        "",
        "```python",
        *_loading_snippet(source, repo_id),
        "```",
        "",
        "## Hyper-parameters",
        "",
    ]
    if unchanged:
        lines.append("None apply: no training made it into this checkpoint (the run's settings are in "
                     f"`{PROVENANCE_NAME}`).")
    elif hparams:
        lines += ["| name | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_format_value(v))} |" for k, v in hparams.items()]
    else:
        lines.append("No hyper-parameters were recorded.")
    lines += ["", "## Evaluation", ""]
    lines += _metrics_section(metrics)
    lines += [
        "",
        "## Provenance",
        "",
        f"`{PROVENANCE_NAME}` records the lpconvert version, the base model, the command, configuration, seeds and "
        "data fingerprint of the run that produced this checkpoint.",
    ]
    if logs:
        lines += ["", f"`{MODEL_LOGS}/` holds the run's TensorBoard logs: every metric of every epoch (the Hub shows "
                      "them under Training metrics)."]
    lines += [
        "",
        "## Citation",
        "",
        "```bibtex",
        PAPER_BIBTEX,
        "```",
        "",
    ]
    return "\n".join(lines)


def is_the_start(averaging: Mapping[str, Any] | None) -> bool:
    """Whether the saved model is the run's starting checkpoint unchanged: no epoch beat it (epoch 0 exported), or
    the interpolation with the start chose α = 0."""
    averaging = averaging or {}
    interpolation = (averaging.get("selection") or {}).get("interpolation") or {}
    return averaging.get("epoch") == 0 or interpolation.get("alpha") == 0


def _library_text(source: ModelSource) -> str:
    """Where the architecture comes from: lpconvert's own (registered with timm) or the library's."""
    if is_lpconvert_architecture(source.architecture):
        return "an lpconvert architecture, registered with timm when lpconvert is imported"
    return source.library


def _loads(source: ModelSource) -> str:
    """What loading needs: nothing of lpconvert for a timm / torchvision architecture; lpconvert for its own."""
    if is_lpconvert_architecture(source.architecture):
        return (f"loads with timm once lpconvert is installed (it defines `{source.architecture}`: install it from "
                "lpconvert's source repository, `pip install -e .` in a checkout, until it is on the package index)")
    return "loads without lpconvert"


def _unchanged_paragraph(source: ModelSource, base: str, averaging: Mapping[str, Any]) -> str:
    """What an unchanged start is: what the run tried, and that nothing of it made it in."""
    K = averaging.get("run_K", averaging.get("K"))
    tried = "plain fine-tuning (K = 1)" if K == 1 else f"fine-tuning with K = {K} late-phase members"
    return (f"This is {base} (`{source.architecture}`, {_library_text(source)}) exactly as it was: lpconvert tried "
            f"{tried}, and no result beat the starting checkpoint on the validation set, so the start was kept. It "
            f"{_loads(source)}.")


def _verdict(metrics: Mapping[str, Any] | None, averaging: Mapping[str, Any] | None) -> list[str]:
    """First, in plain words: did the checkpoint get better than the start — on the validation set, and on the test
    set when both were measured there — with the uncertainty one run can give (none over seeds)."""
    metrics = metrics or {}
    parts = []
    for start, final, where in (("base", "final", "dataset"), ("base_test", "test", "test_dataset")):
        a, b = (metrics.get(start) or {}).get("top1"), (metrics.get(final) or {}).get("top1")
        if a is None or b is None:
            continue
        dataset = metrics.get(where) or {}
        n = dataset.get("num_images")
        noise = f"; one accuracy on {n:,} images is uncertain by about ±{sampling_error(b, n):.2f} points" if n else ""
        parts.append(f"top-1 on {describe_dataset(dataset)}: {_metric_text('top1', a, n)} % → "
                     f"{_metric_text('top1', b, n)} % ({b - a:+.{percent_decimals(n)}f} points{noise})")
    if not parts:
        return []
    if is_the_start(averaging):
        head = "**Did fine-tuning help? No**: this is the starting checkpoint, unchanged"
    else:
        head = "**Against the starting checkpoint**"
    return [f"{head} — " + "; ".join(parts) + ". One run gives no interval over seeds: `lpconvert compare` measures "
            "the change over paired seeds.", ""]


def sampling_error(top1: float, num_images: int) -> float:
    """The 95 % sampling error (points) of one top-1 accuracy `top1` (%) measured on `num_images` images:
    1.96 · √(p (1 − p) / N)."""
    p = min(max(top1 / 100, 0.0), 1.0)
    return 196 * math.sqrt(p * (1 - p) / num_images)


def _method_paragraph(source: ModelSource, base: str, averaging: Mapping[str, Any] | None) -> str:
    """What was done, from what ran: plain fine-tuning for K = 1, else the kinds of late-phase weights and K (a
    generic account when `averaging` does not say)."""
    this = f"This is `{source.architecture}` ({_library_text(source)}), trained from {base}"
    if averaging and averaging.get("K") == 1:
        return (f"{this} by plain fine-tuning (K = 1): lpconvert's baseline for **late-phase weights** (von Oswald et "
                "al., ICLR 2021), trained through the same pipeline without late-phase members. It has exactly the "
                f"architecture and inference cost of the base model and {_loads(source)}."
                + _selection_sentence(averaging))
    which = "a small set of weights"
    if averaging and averaging.get("late_phase") and averaging.get("K"):
        which = f"its {_kinds_text(averaging['late_phase'])} weights"
    copies = f"K = {averaging['K']}" if averaging and averaging.get("K") else "K"
    return (f"{this} with **late-phase weights** (von Oswald et al., ICLR 2021). Late in training, {which} were "
            f"replaced by {copies} copies, the ensemble members, which were trained together with the shared remaining "
            "weights, each on its own minibatches. At the end the members were averaged (\"collapsed\") into a single "
            f"set, so this checkpoint has exactly the architecture and inference cost of the base model and "
            f"{_loads(source)}." + _selection_sentence(averaging))


def _selection_sentence(averaging: Mapping[str, Any] | None) -> str:
    """One more sentence when the model is not the plain average: a greedy soup, an interpolation with the start."""
    selection = (averaging or {}).get("selection") or {}
    interpolation = selection.get("interpolation") or {}
    parts = []
    if selection.get("soup") == "greedy":
        parts.append("only the members that a greedy soup kept on the validation set were averaged")
    if interpolation:
        parts.append("the result was interpolated in weight space with the run's starting model")
    return f" Beyond that, {' and '.join(parts)} (see below)." if parts else ""


def _kinds_text(kinds: str) -> str:
    """``"batchnorm,classifier"`` as ``"batchnorm and classifier"``."""
    names = [kind for kind in kinds.split(",") if kind]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _what_it_is(source: ModelSource, averaging: Mapping[str, Any] | None) -> list[str]:
    lines = [f"- The original `{source.architecture}` architecture ({_library_text(source)}): the base model's "
             "classes, state_dict keys and inference cost; no late-phase layer is left in it."]
    if not averaging:
        return lines
    kinds = averaging.get("late_phase")
    when = f" at epoch {averaging['epoch']}" if averaging.get("epoch") is not None else ""
    if averaging.get("select"):
        when += f" ({'the best validation epoch' if averaging['select'] == 'best' else 'the last epoch'})"
    selection = averaging.get("selection") or {}
    interpolation = selection.get("interpolation") or {}
    if averaging.get("epoch") == 0:
        lines.append("- It is the run's starting checkpoint, unchanged: no epoch of the run beat it on the validation "
                     "set.")
        return lines
    if interpolation.get("alpha") == 0:
        lines.append(f"- It is the run's starting model, unchanged: the fine-tuned model{when} was interpolated with "
                     f"it, and α = 0 (the start) {_alpha_choice(interpolation)}.")
        if averaging.get("training_data"):
            lines.append(f"- Training data: {averaging['training_data']}.")
        return lines
    if averaging.get("K") == 1:
        lines.append(f"- Fine-tuned without late-phase members (K = 1: plain fine-tuning), taken{when}.")
    else:
        which = f"{_kinds_text(kinds)} weights" if kinds else "late-phase weights"
        sigma0 = f", initialised with σ0 = {averaging['sigma0']:g} (Eq. 2)," if averaging.get("sigma0") else ""
        if selection.get("soup") == "greedy":
            lines.append(f"- Its {which} are the average of {len(selection['members'])} of the K = "
                         f"{averaging.get('K')} late-phase members{sigma0} in weight space (Eq. 1 of the paper){when}; "
                         f"{_greedy_text(selection)}")
        else:
            lines.append(f"- Its {which} are the average of K = {averaging.get('K')} late-phase members{sigma0} in "
                         f"weight space (Eq. 1 of the paper){when}.")
    if averaging.get("swa_start") is not None:
        lines.append(f"- The weights were also averaged over the epochs from epoch {averaging['swa_start']} on (SWA).")
    interpolated = bool(interpolation) and interpolation.get("alpha") != 1
    if late_batchnorm(averaging) and averaging.get("bn_stats") in _BN_STATS_TEXT and not interpolated:
        lines.append(f"- {_BN_STATS_TEXT[averaging['bn_stats']]}")
    if interpolation:
        lines.append(f"- {_interpolation_text(interpolation)}")
    if averaging.get("training_data"):
        lines.append(f"- Training data: {averaging['training_data']}.")
    return lines


def _scores_text(rows: Sequence[Sequence[Any]], name: str) -> str:
    return ", ".join(f"{name} {key:g}: {score:.2f}" for key, score in rows)


def _greedy_text(selection: Mapping[str, Any]) -> str:
    """How a greedy soup chose its members, with its numbers (validation top-1, %)."""
    members = ", ".join(map(str, selection["members"]))
    return (f"a greedy soup (Wortsman et al., ICML 2022) chose members {members} (numbered from 0, in the order "
            "they entered). The members were ranked by their validation top-1 (%) "
            f"({_scores_text(selection['ranking'], 'member')}) and added best first, each kept only when the average "
            f"did not score lower; the soup scores {selection['score']:.2f} % validation top-1, the average of all "
            f"{selection['K']} members {selection['uniform_score']:.2f} % (chosen on the validation set: these figures "
            "are optimistic).")


def _alpha_choice(interpolation: Mapping[str, Any]) -> str:
    if interpolation.get("chosen") != "auto":
        return "was given"
    return (f"scored best in validation top-1 (%) of the α tried ({_scores_text(interpolation['scores'], 'α')}; "
            "ties go to the smaller α)")


def _interpolation_text(interpolation: Mapping[str, Any]) -> str:
    """The interpolation with the start (WiSE-FT) as it happened, its BatchNorm statistics included."""
    alpha = interpolation["alpha"]
    if alpha == 1:
        return (f"It was interpolated with the run's starting model, and α = 1 {_alpha_choice(interpolation)}: the "
                "averaged model unchanged.")
    text = (f"It was then interpolated in weight space with the run's starting model (WiSE-FT, Wortsman et al., CVPR "
            f"2022): every weight is (1 − α) θ_start + α θ_averaged with α = {alpha:g}, which "
            f"{_alpha_choice(interpolation)}.")
    batchnorm = {"interpolated": " BatchNorm running statistics are interpolated likewise.",
                 "re-estimated": " BatchNorm running statistics were re-estimated with a pass over augmented training "
                                 "images."}
    return text + batchnorm.get(interpolation.get("batchnorm"), "")


def late_batchnorm(averaging: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint's BatchNorm layers were late-phase (K > 1 members averaged), so that the card says how
    their statistics were made; shared BatchNorm (K = 1, or other kinds only) was trained as usual."""
    kinds = (averaging or {}).get("late_phase") or ""
    return ((averaging or {}).get("K") or 1) > 1 and "batchnorm" in kinds.split(",")


def _loading_snippet(source: ModelSource, repo_id: str) -> list[str]:
    if source.library == "timm":
        load = [f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)  # or "local-dir:PATH/TO/THIS/FOLDER"']
        imports = ["import timm"]
        if is_lpconvert_architecture(source.architecture):
            imports = [f"# pip install lpconvert   ({source.architecture} is an lpconvert architecture; importing "
                       "lpconvert registers it with timm)", "import lpconvert, timm"]
    else:
        args = ", ".join(f"{k}={v!r}" for k, v in source.model_args.items())
        imports = ["import torchvision, safetensors.torch, huggingface_hub, timm"]
        load = [f'model = torchvision.models.get_model("{source.architecture}", weights=None, {args})',
                f'model.load_state_dict(safetensors.torch.load_file(huggingface_hub.hf_hub_download("{repo_id}", '
                f'"{WEIGHTS_NAME}")))']
    return [
        *imports,
        *load,
        "model.eval()",
        "# the preprocessing the accuracy below was measured with (resize, center crop, normalize)",
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)",
        "# probabilities = model(transform(image).unsqueeze(0)).softmax(-1)   # image: a PIL image",
    ]


def percent_decimals(num_images: int | None) -> int:
    """Decimals of a percentage over `num_images` images, to what it resolves (one image is 100/N %): 2 up to 10,000
    images, one more per factor of ten beyond (ImageNet's 50,000: 3); 2 when the number is not known."""
    if not num_images or num_images <= 10_000:
        return 2
    return 2 + math.ceil(math.log10(num_images / 10_000))


def _decimals(name: str, num_images: int | None) -> int:
    """What metric `name` over `num_images` images resolves: percentages by :func:`percent_decimals`, NLL, ECE and
    the others to 4 decimals."""
    return percent_decimals(num_images) if name in _PERCENT_METRICS else _OTHER_DECIMALS


def round_metric(name: str, value: float, num_images: int | None) -> float:
    """`value` of metric `name` rounded to what it resolves (:func:`_decimals`)."""
    return round(value, _decimals(name, num_images))


def _metric_text(name: str, value: float | None, num_images: int | None) -> str:
    return "n/a" if value is None else f"{value:.{_decimals(name, num_images)}f}"


def evaluations(metrics: Mapping[str, Any] | None) -> list[tuple[str, Mapping[str, Any], Mapping[str, float]]]:
    """The card's evaluations as (label, the set measured on, metric name → number) rows: the base checkpoint and
    this model on ``metrics["dataset"]``, and this model on ``metrics["test_dataset"]`` when ``metrics["test"]`` is
    given; the test set takes the validation set's ``type`` and ``name`` (the same data) unless it has its own."""
    metrics = metrics or {}
    rows = []
    for label, part, where in _EVALUATIONS:
        if metrics.get(part):
            data = {key: value for key, value in (metrics.get("dataset") or {}).items() if key in ("type", "name")}
            rows.append((label, {**data, **(metrics.get(where) or {})}, metrics[part]))
    return rows


def describe_dataset(dataset: Mapping[str, Any]) -> str:
    """``"NAME, SPLIT split, N images"`` of what is known about a set; ``"n/a"`` when nothing is."""
    parts = [str(dataset["name"])] if dataset.get("name") else []
    if dataset.get("held_out"):
        parts += ["training images held out (never trained on)"]
    elif dataset.get("split"):
        parts += [f"{dataset['split']} split"]
    parts += [f"{dataset['num_images']:,} images"] if dataset.get("num_images") else []
    return ", ".join(parts) or "n/a"


def _eval_results(metrics: Mapping[str, Any] | None) -> list[EvalResult]:
    """This model's top-1 / top-5 on each split of the data it was evaluated on (validation, and test when given), for
    the ``model-index``: only sets with a name and a type, never images held out of the training split (they are not
    a split of the dataset), values rounded to what they resolve."""
    return [
        EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=dataset["type"],
                   dataset_name=dataset["name"], dataset_split=dataset.get("split"), metric_type=metric_type,
                   metric_name=metric_name, metric_value=round_metric(key, values[key], dataset.get("num_images")))
        for label, dataset, values in evaluations(metrics) if label == "this model" and dataset.get("type")
        and dataset.get("name") and not dataset.get("held_out")
        for key, metric_type, metric_name in _EVAL_METRICS if values.get(key) is not None
    ]


def _metrics_section(metrics: Mapping[str, Any] | None) -> list[str]:
    rows = evaluations(metrics)
    if not rows:
        return ["No evaluation was recorded for this model."]
    names = list(dict.fromkeys([n for n in _METRIC_LABELS if any(n in values for _, _, values in rows)]
                               + [n for _, _, values in rows for n in values]))
    lines = ["| model | evaluated on | " + " | ".join(_cell(_METRIC_LABELS.get(n, n)) for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for label, dataset, values in rows:
        numbers = " | ".join(_metric_text(n, values.get(n), dataset.get("num_images")) for n in names)
        lines.append(f"| {label} | {_cell(describe_dataset(dataset))} | {numbers} |")
    if metrics.get("protocol"):
        lines += ["", f"Protocol: {metrics['protocol']}"]
    return lines


def _format_value(value: Any) -> str:
    """A hyper-parameter as the card shows it: text as is, a float to 6 significant digits, none for None."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    return "none" if value is None else json.dumps(value, default=str)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
