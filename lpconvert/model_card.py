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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCardData

from lpconvert.files import PROVENANCE_NAME, WEIGHTS_NAME
from lpconvert.models import is_lpconvert_architecture
from lpconvert.tensorboard import MODEL_LOGS

if TYPE_CHECKING:
    from lpconvert.loading import ModelSource


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


_METRIC_LABELS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "nll": "negative log-likelihood"}
#: The model-index entries: the metric, its Hub metric type and its name on the model page (values in percent).
_EVAL_METRICS = (("top1", "accuracy", "Top-1 accuracy"), ("top5", "top_5_accuracy", "Top-5 accuracy"))
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
    ``swa_start``, ``training_data``); ``datasets`` are the Hub ids of the training data; ``metrics["dataset"]``
    (``type``: a Hub dataset id or a name, ``name``, ``split``) names the set ``metrics`` were measured on, which the
    ``model-index`` needs; ``logs``: the folder holds the run's TensorBoard logs (:data:`MODEL_LOGS`)."""
    title = f"{source.architecture} with late-phase weights"
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
        f"This is `{source.architecture}` ({source.library}), trained from {base} with **late-phase weights** "
        "(von Oswald et al., ICLR 2021). Late in training, a small set of weights (here the ones listed under the "
        "hyper-parameters below, typically BatchNorm and classifier weights) is replaced by K copies, the ensemble "
        "members, which are trained together with the shared remaining weights, each on its own minibatches. At "
        "the end the members are averaged (\"collapsed\") into a single set, so this checkpoint has exactly the "
        "architecture and inference cost of the base model and loads without lpconvert.",
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
    if hparams:
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


def _what_it_is(source: ModelSource, averaging: Mapping[str, Any] | None) -> list[str]:
    lines = [f"- The original `{source.architecture}` architecture ({source.library}): the base model's classes, "
             "state_dict keys and inference cost; nothing of lpconvert is needed at inference."]
    if not averaging:
        return lines
    kinds = averaging.get("late_phase") or "late-phase"
    when = f" at epoch {averaging['epoch']}" if averaging.get("epoch") is not None else ""
    if averaging.get("select"):
        when += f" ({'the best validation epoch' if averaging['select'] == 'best' else 'the last epoch'})"
    if averaging.get("K") == 1:
        lines.append(f"- Fine-tuned without late-phase members (K = 1: plain fine-tuning), taken{when}.")
    else:
        lines.append(f"- Its {kinds} weights are the average of K = {averaging.get('K')} late-phase members in weight "
                     f"space (Eq. 1 of the paper){when}.")
    if averaging.get("swa_start") is not None:
        lines.append(f"- The weights were also averaged over the epochs from epoch {averaging['swa_start']} on (SWA).")
    if averaging.get("bn_stats") in _BN_STATS_TEXT:
        lines.append(f"- {_BN_STATS_TEXT[averaging['bn_stats']]}")
    if averaging.get("training_data"):
        lines.append(f"- Training data: {averaging['training_data']}.")
    return lines


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


def _eval_results(metrics: Mapping[str, Any] | None) -> list[EvalResult]:
    """This model's top-1 / top-5 on the set ``metrics["dataset"]`` names, for the ``model-index``."""
    final, dataset = (metrics or {}).get("final") or {}, (metrics or {}).get("dataset")
    if not dataset:
        return []
    return [
        EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=dataset["type"],
                   dataset_name=dataset["name"], dataset_split=dataset.get("split"), metric_type=metric_type,
                   metric_name=metric_name, metric_value=round(final[key], 2))
        for key, metric_type, metric_name in _EVAL_METRICS if final.get(key) is not None
    ]


def _metrics_section(metrics: Mapping[str, Any] | None) -> list[str]:
    if not metrics or not (metrics.get("base") or metrics.get("final")):
        return ["No evaluation was recorded for this model."]
    base = dict(metrics.get("base") or {})
    final = dict(metrics.get("final") or {})
    names = [n for n in _METRIC_LABELS if n in base or n in final]
    names += [n for n in list(base) + list(final) if n not in names and n not in _METRIC_LABELS]
    names = list(dict.fromkeys(names))
    lines = []
    if base.get("top1") is not None and final.get("top1") is not None:
        dataset = metrics.get("dataset") or {}
        where = f" on {dataset['name']}" if dataset else ""
        where += f" ({dataset['split']} split)" if dataset.get("split") else ""
        lines += [f"Top-1 accuracy{where}: **{final['top1']:.2f} %**, against {base['top1']:.2f} % for the base "
                  f"checkpoint ({final['top1'] - base['top1']:+.2f} points).", ""]
    lines += ["| metric | base checkpoint | this model |", "|---|---|---|"]
    for name in names:
        label = _METRIC_LABELS.get(name, name)
        lines.append(f"| {_cell(label)} | {_format_number(base.get(name))} | {_format_number(final.get(name))} |")
    if metrics.get("protocol"):
        lines += ["", f"Protocol: {metrics['protocol']}"]
    return lines


def _format_number(value: Any) -> str:
    return "n/a" if value is None else str(value)


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
