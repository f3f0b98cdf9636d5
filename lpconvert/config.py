"""One dataclass for a fine-tuning run: every hyper-parameter of Algorithm 1 and of the loop around it.

Defaults are the paper's ImageNet recipe (§4, Table 5): SGD with momentum 0.9, weight decay 1e-4, batch 256,
lr 0.001 dropping ×0.1 at epoch 10, 20 epochs, K = 10, σ0 = 0, γθ = 1/K, late-phase BatchNorm only.
A recipe file (YAML or TOML, see ``zoo/``) sets any of these fields but ``force``; command-line flags override it.
Every value is coerced to its field's type or refused, then checked for range and against the other fields, whether
it came from a flag, a recipe or Python code.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lpconvert.collapse.average import input_mismatch
from lpconvert.collapse.soup import SOUPS, parse_alpha
from lpconvert.convert.surgery import DEFAULT_TARGETS, resolve_kinds
from lpconvert.data import DIGITS, hub_name
from lpconvert.data.memory import IN_MEMORY_MODES, MEMORY_BUDGET
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError
from lpconvert.layers import BN_STATS_MODES, check_kind_options, kinds_help, options_help
from lpconvert.layers.options import READERS
from lpconvert.train.optim_settings import OptimSettings

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "linear", "cosine", "constant")
MODES = ("auto", "sequential", "vectorized")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SELECT = ("best", "last")
TRAIN_TRANSFORMS = ("auto", "timm", "cifar")
LOGGERS = ("tensorboard",)
#: --batch-size when neither it nor --batch-size-per-gpu is given (the two are refused together).
DEFAULT_BATCH_SIZE = 256
#: Settings that give one quantity two ways: a command-line flag for one replaces a recipe's (or a saved run's) other.
SAME_QUANTITY = (("batch_size", "batch_size_per_gpu"), ("img_size", "input_size"))
#: The --dist-timeout minutes allowed: a second to a week (torch's collectives take a timedelta, which overflows).
DIST_TIMEOUT_RANGE = (1 / 60, 7 * 24 * 60.0)


def _setting(default: Any, help: str, *, choices: tuple[str, ...] = (), path: Literal["file", "dir"] | None = None,
             argument: bool = False, aliases: tuple[str, ...] = (), flag_value: str | None = None,
             nargs: int | None = None) -> Any:
    """A :class:`FinetuneConfig` field with its command-line facts as metadata (see the class)."""
    metadata: dict[str, Any] = {"help": help}
    if nargs is not None:
        metadata["nargs"] = nargs
    if aliases:
        metadata["aliases"] = aliases
    if flag_value is not None:
        metadata["flag_value"] = flag_value
    if choices:
        metadata["choices"] = choices
    if path:
        metadata["path"] = path
    if argument:
        metadata["argument"] = True
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class FinetuneConfig:
    """Every setting of a run. Each field carries its command-line facts in its metadata, from which ``lpconvert
    finetune`` (and ``inspect``, for the settings it shares) makes its flags: ``help`` (every field), ``choices`` (the
    values allowed; :data:`CHOICES`), ``path`` (``"file"`` or ``"dir"``: the flag takes a path to one) and
    ``argument`` (the command's positional argument rather than a flag), ``aliases`` (timm's names for the same flag,
    e.g. ``-b`` for ``--batch-size``), ``flag_value`` (the value of the flag given alone, e.g. ``--amp``) and ``nargs``
    (a list flag that takes that many separate values, timm's ``--input-size 3 224 224``, instead of comma-separated
    text). A flag is ``--`` and the field's name with dashes (:func:`flag`); its type is the field's."""

    # model
    model: str = _setting("resnet152", "timm name, tv:NAME, hf-hub:ORG/NAME, local-dir:DIR or a registered model.",
                          argument=True)
    weights: str | None = _setting(None, "Local weights (.safetensors, or a state_dict loaded weights-only).",
                                   path="file")
    num_classes: int | None = _setting(None, "New classifier with this many classes (transfer), whatever the source "
                                             "of the weights.")
    pretrained: bool = _setting(True, "Start from the hub's pretrained weights.")
    # data
    data: str | None = _setting(None, "Data root with train/ and val/ (or validation/, test/), folders or tar "
                                      "archives, or 'sklearn-digits'.")
    train_dir: str | None = _setting(None, "Training ImageFolder tree or archive.")
    val_dir: str | None = _setting(None, "Validation ImageFolder tree or archive.")
    dataset: str | None = _setting(None, "hfds/NAME: a Hugging Face dataset (Hub id or local dataset folder) "
                                         "instead of --data; its train split and val, validation or test split.")
    class_map: str | None = _setting(None, "Text file, one class name per line: line i is label i [default: "
                                           "WordNet-ID classes get ImageNet indices, else folders alphabetically, a "
                                           "dataset's ClassLabel in its order].", path="file")
    train_subset: int | None = _setting(None, "Use a stratified subset of this many training images.")
    val_subset: int | None = _setting(None, "Use a stratified subset of this many images of the data's validation (or test) split.")
    val_split: float = _setting(0.1, "When the data's evaluation split is a test set (test/, a dataset's test split, "
                                     "sklearn-digits): hold out this fraction of the training images, stratified "
                                     "(--subset-seed), to validate and select on; the test set is evaluated once, at "
                                     "the end. 0: no hold-out (then only --select last).")
    subset_seed: int = _setting(0, "Which stratified subsets (fixed across --seed, so seeds compare on the same "
                                   "images).")
    input_size: tuple[int, ...] = _setting((), "Input size C H W of the model's preprocessing, e.g. 3 224 224 "
                                                "[default: the model's data config].", nargs=3)
    img_size: int | None = _setting(None, "Square input size N (the model's channels) [default: the model's data "
                                          "config].")
    crop_pct: float | None = _setting(None, "Center-crop fraction of evaluation preprocessing, in (0, 1] [default: "
                                            "the model's data config].")
    train_transform: str = _setting("auto", "Training augmentation (auto: cifar up to 64 px, else timm).",
                                    choices=TRAIN_TRANSFORMS)
    data_in_memory: str = _setting("auto", "Decode image folders once into memory and augment whole batches (auto: "
                                           "with the cifar augmentation, when training and validation images fit in "
                                           f"{MEMORY_BUDGET / 2**30:g} GiB).", choices=IN_MEMORY_MODES)
    workers: int = _setting(4, "Data-loading worker processes.", aliases=("-j",))
    # late-phase weights (Algorithm 1)
    K: int = _setting(10, "Late-phase members (1 = plain fine-tuning through the same pipeline).")
    late_phase: tuple[str, ...] = _setting(DEFAULT_TARGETS, f"Late-phase weights, comma-separated: {kinds_help()}.")
    late_phase_options: tuple[str, ...] = _setting((), f"Options of the kinds, comma-separated KIND.OPTION=VALUE "
                                                       f"(hypernet.rank=4): {options_help()}.")
    include: tuple[str, ...] = _setting((), "Comma-separated globs on qualified layer names to convert ('layer4.*').")
    exclude: tuple[str, ...] = _setting((), "Comma-separated globs on qualified layer names to keep shared.")
    sigma0: float = _setting(0.0, "Member initialisation noise σ0 (Eq. 2).")
    gamma_theta: float | None = _setting(None, "γθ scaling the accumulated shared-weight gradient [default: 1/K].")
    t0: int = _setting(0, "Epoch at which late-phase training starts (plain training before).")
    accumulate: int = _setting(1, "With --K 1: θ accumulates over this many minibatches (Table 10 control).")
    # optimisation: U_θ, and U_φ where the member_* fields differ
    epochs: int = _setting(20, "Epochs.")
    batch_size: int | None = _setting(None, "Global minibatch size per member step (split evenly among the "
                                            f"processes) [default: {DEFAULT_BATCH_SIZE}].", aliases=("-b",))
    batch_size_per_gpu: int | None = _setting(None, "Minibatch size per process instead of --batch-size: the global "
                                                    "batch is this times the number of processes.")
    optimizer: str = _setting("sgd", "U_θ.", choices=OPTIMIZERS, aliases=("--opt",))
    lr: float = _setting(0.001, "Learning rate of U_θ (and U_φ unless --member-lr).")
    momentum: float = _setting(0.9, "SGD momentum.")
    nesterov: bool = _setting(False, "Nesterov momentum.")
    weight_decay: float = _setting(1e-4, "Weight decay of U_θ (and U_φ unless --member-weight-decay).")
    member_optimizer: str | None = _setting(None, "U_φ [default: as U_θ].", choices=OPTIMIZERS)
    member_lr: float | None = _setting(None, "Learning rate of U_φ [default: --lr].")
    member_weight_decay: float | None = _setting(None, "Late-phase weight decay (paper, CIFAR: 5e-4·K) "
                                                       "[default: --weight-decay].")
    schedule: str = _setting("multistep", "Learning-rate schedule.", choices=SCHEDULES, aliases=("--sched",))
    milestones: tuple[float, ...] = _setting((10,), "Epochs (comma-separated, fractions allowed) where multistep "
                                                    "scales the lr by --lr-gamma.")
    lr_gamma: float = _setting(0.1, "Multistep factor.")
    lr_end: float = _setting(0.0, "Final learning rate of the linear and cosine schedules.")
    anneal_start: float = _setting(0.0, "Linear schedule: epoch where annealing starts.")
    anneal_end: float | None = _setting(None, "Linear schedule: epoch where annealing ends [default: --epochs].")
    warmup_epochs: float = _setting(0.0, "Epochs of linear learning-rate warm-up from --warmup-lr (U_θ and U_φ).")
    warmup_lr: float = _setting(1e-5, "Learning rate at the start of the warm-up.")
    smoothing: float = _setting(0.0, "Label smoothing of the training loss (every member's and so θ's).")
    clip_grad: float | None = _setting(None, "Clip the gradient norm of each member's step and of θ's step to this.")
    swa_start: int | None = _setting(None, "Epoch from which SWA averages the (late-phase) model; 0 = from the "
                                           "pretrained checkpoint on. BatchNorm statistics of the average are "
                                           "re-estimated on training images (--recalibrate-batches).")
    swa_lr: float | None = _setting(None, "Learning rate of SWA: from --swa-start the schedule is replaced by this "
                                          "constant rate (after --swa-anneal-epochs).")
    swa_freq: int | None = _setting(None, "Add the model to the SWA average every N training minibatches (counted "
                                          "from --swa-start, the same for every K) [default: once, at each epoch's "
                                          "end].")
    swa_anneal_epochs: float = _setting(0.0, "Epochs over which the learning rate moves from the schedule's rate at "
                                             "--swa-start to --swa-lr (cosine, as torch's SWALR) [default: at once].")
    # execution
    mode: str = _setting("auto", "Member execution (identical results).", choices=MODES)
    group_size: int | None = _setting(None, "Members per forward in vectorized mode [default: K].")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N.")
    amp: str = _setting("auto", "Autocast (auto: bf16 on GPU, off on CPU; --amp alone: bf16).", choices=AMP_MODES,
                        flag_value="bf16")
    channels_last: bool | None = _setting(None, "Memory format [default: on GPU].")
    compile: bool = _setting(False, "torch.compile the model.")
    sync_bn: bool = _setting(False, "SyncBatchNorm across GPUs under torchrun.")
    dist_timeout: float = _setting(60.0, "Minutes a process waits for the others in a collective under torchrun "
                                         "(long enough for the largest evaluation) before the run fails.")
    threads: int | None = _setting(None, "CPU threads per process for torch [default: the CPUs this process may use, "
                                         "shared among the processes torchrun starts on the node, less those other "
                                         "processes keep busy when it starts; at most torch's count; a resumed run "
                                         "keeps its own]. Results are bit-identical for a fixed thread count.")
    # bookkeeping
    seed: int = _setting(0, "Seed of data order, augmentation and σ0 noise.")
    output: str | None = _setting(None, "Run directory [default: a new runs/<date>-<time>-MODEL-K<K>].")
    bn_stats: str = _setting("fold", "BN statistics of the averaged model (fold: members' mean statistics, eval "
                                     "outputs averaged).", choices=BN_STATS_MODES)
    recalibrate_batches: int = _setting(100, "Training batches used by --bn-stats recalibrate (and SWA).")
    select: str = _setting("best", "Which epoch's model is collapsed and written.", choices=SELECT)
    soup: str = _setting("uniform", "Which members are averaged: all (uniform, Eq. 1), or those a greedy soup keeps "
                                    "(ranked by validation top-1, each kept if the average does not score lower).",
                         choices=SOUPS)
    interpolate: str | None = _setting(None, "Interpolate the averaged model with the starting checkpoint, θ = "
                                             "(1 − α) θ_start + α θ_averaged (WiSE-FT): α in [0, 1], or auto (the "
                                             "best α of 0, 0.1, …, 1 on the validation set) [default: none].")
    checkpoint_every: int = _setting(0, "Also checkpoint every N iterations (0: epoch ends only).")
    log: str | None = _setting(None, "Also log every metrics.jsonl field per epoch to RUN/tensorboard/, published "
                                     "with the model (pip install 'lpconvert[tensorboard]').", choices=LOGGERS)
    log_every: int = _setting(50, "Progress update every N iterations (no host sync in between).",
                              aliases=("--log-interval",))
    resume: str | None = _setting(None, "Continue the run in this directory exactly.", path="dir")
    force: bool = _setting(False, "Replace an lpconvert run at --output (after the new one succeeded), or resume "
                                  "with changed settings.")
    quiet: bool = _setting(False, "No progress bars; per-epoch log lines only.")
    push_to_hub: str | None = _setting(None, "Push the collapsed model to this Hub repo (ORG/NAME) at the end.")
    allow_regression: bool = _setting(False, "Push even if worse than the start.")

    def __post_init__(self) -> None:
        """Coerce every field to its declared type (refusing what cannot be), then :meth:`validate`."""
        for name, hint in field_types().items():
            setattr(self, name, _coerce(name, getattr(self, name), hint))
        if self.batch_size is None and self.batch_size_per_gpu is None:
            self.batch_size = DEFAULT_BATCH_SIZE
        self.validate()

    def validate(self) -> FinetuneConfig:
        """Ranges, finiteness and rules between fields; a one-line :class:`LatePhaseError` naming the flag."""
        for name in ("K", "epochs", "log_every", "recalibrate_batches", "accumulate"):
            self._require(name, getattr(self, name) >= 1, "must be a positive integer")
        for name in ("t0", "checkpoint_every", "workers", "seed", "subset_seed"):
            self._require(name, getattr(self, name) >= 0, "must be 0 or more")
        for name in ("seed", "subset_seed"):
            self._require(name, getattr(self, name) < 2**32, "must be below 2^32 (4294967296)")
        for name in ("train_subset", "val_subset", "num_classes", "group_size", "threads", "batch_size"):
            self._require(name, getattr(self, name) is None or getattr(self, name) >= 1, "must be a positive integer")
        for name in ("lr", "member_lr", "gamma_theta", "lr_gamma", "swa_lr", "warmup_lr", "clip_grad"):
            self._require(name, getattr(self, name) is None or getattr(self, name) > 0, "must be a positive number")
        for name in ("weight_decay", "member_weight_decay", "sigma0", "lr_end", "anneal_start", "warmup_epochs",
                     "swa_anneal_epochs"):
            self._require(name, getattr(self, name) is None or getattr(self, name) >= 0, "must be 0 or more")
        self._require("momentum", 0 <= self.momentum < 1, "must lie in [0, 1)")
        self._require("val_split", 0 <= self.val_split < 1, "must lie in [0, 1)")
        self._require("batch_size_per_gpu", self.batch_size_per_gpu is None or self.batch_size_per_gpu >= 1,
                      "must be a positive integer")
        self._require("batch_size_per_gpu", self.batch_size_per_gpu is None or self.batch_size is None,
                      f"and --batch-size {self.batch_size} both set the batch; pass one (--batch-size is the global "
                      "batch, --batch-size-per-gpu the batch of each process)")
        self._require("dist_timeout", DIST_TIMEOUT_RANGE[0] <= self.dist_timeout <= DIST_TIMEOUT_RANGE[1],
                      f"must lie between {DIST_TIMEOUT_RANGE[0]:.4g} (a second) and {DIST_TIMEOUT_RANGE[1]:g} (a week) "
                      "minutes")
        self._require("smoothing", 0 <= self.smoothing < 1, "must lie in [0, 1)")
        self._require("input_size", not self.input_size or (len(self.input_size) == 3 and min(self.input_size) >= 1),
                      "must be three positive integers C H W")
        if len(self.input_size) == 3:  # H W C, channels last, reads as many channels of images a few pixels wide
            c, h, w = self.input_size
            self._require("input_size", not w <= 4 < c, f"is C H W, channels first: {c} {h} {w} reads as {c} channels "
                          f"of {h}×{w} images; for {w}-channel {c}×{h} images pass --input-size {w} {c} {h}")
        self._require("img_size", self.img_size is None or not self.input_size,
                      f"and --input-size {_shown(self.input_size)} both set the input size; pass one")
        self._require("img_size", self.img_size is None or self.img_size >= 1, "must be a positive integer")
        self._require("crop_pct", self.crop_pct is None or 0 < self.crop_pct <= 1, "must lie in (0, 1]")
        for name in ("input_size", "img_size", "crop_pct"):
            self._require(name, not getattr(self, name) or self.data != DIGITS,
                          f"sets a model's image preprocessing; {DIGITS} are fixed 8x8 tensors")
        self._require("warmup_epochs", self.warmup_epochs < self.epochs, f"must be shorter than --epochs {self.epochs}")
        self._require("nesterov", not self.nesterov or self.momentum > 0, "needs --momentum > 0")
        self._require("t0", self.t0 < self.epochs, f"must be smaller than --epochs {self.epochs}")
        self._require("accumulate", self.accumulate == 1 or self.K == 1,
                      "is the K = 1 control (θ accumulated over M minibatches); use it with --K 1")
        self._require("milestones", all(m > 0 for m in self.milestones), "must be positive epochs")
        if self.schedule == "linear":
            self._require("anneal_end", self.anneal_end is None or self.anneal_start < self.anneal_end <= self.epochs,
                          f"must lie in (--anneal-start {self.anneal_start}, --epochs {self.epochs}]")
        self._require("swa_start", self.swa_start is None or 0 <= self.swa_start < self.epochs,
                      f"must lie in [0, {self.epochs})")
        self._require("swa_start", self.swa_start is None or self.swa_start >= self.t0,
                      f"must not come before --t0 {self.t0} (SWA averages the late-phase model)")
        for name in ("swa_lr", "swa_freq"):
            self._require(name, getattr(self, name) is None or self.swa_start is not None, "needs --swa-start")
        self._require("swa_freq", self.swa_freq is None or self.swa_freq >= 1, "must be a positive integer")
        self._require("swa_anneal_epochs", self.swa_anneal_epochs == 0 or self.swa_lr is not None,
                      "anneals into --swa-lr; pass --swa-lr too")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            self._require(name, value is None or value in allowed, f"is not one of {', '.join(allowed)}")
        self._require("device", _is_device(self.device), "must be auto, cpu, cuda or cuda:N")
        parse_alpha(self.interpolate)  # auto or a number α in [0, 1]
        kinds = resolve_kinds(self.late_phase)
        unused = [kind for kind in self.kind_options() if kind not in kinds]
        self._require("late_phase_options", not unused, f"name kinds that --late-phase converts ({', '.join(kinds)})")
        if self.dataset is not None:
            hub_name(self.dataset)
            self._require("dataset", self.data is None and self.train_dir is None and self.val_dir is None,
                          "replaces --data, --train-dir and --val-dir; pass one or the other")
        self._require("class_map", self.class_map is None or self.data != DIGITS,
                      f"names the classes of folders or a dataset; {DIGITS} has its own labels")
        if self.push_to_hub is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError:
                self._require("push_to_hub", False, "is not a Hub repository id; use NAMESPACE/NAME (alice/resnet-lpw)")
        return self

    def kind_options(self) -> dict[str, dict[str, Any]]:
        """``--late-phase-options hypernet.rank=4,rank1.input_weights=true`` as ``{kind: {option: value}}``, each value
        read by the kind's declared option (lpconvert/layers/options.py): unknown kinds and options, an option given
        twice, a malformed boolean or number are refused. Read once (by :meth:`validate`), then kept with the text
        it was read from."""
        read, options = self.__dict__.get("_kind_options", ((), {}))
        if read != self.late_phase_options or not read:
            options = self._read_kind_options()
            self.__dict__["_kind_options"] = (self.late_phase_options, options)
        return {kind: dict(values) for kind, values in options.items()}

    def _read_kind_options(self) -> dict[str, dict[str, Any]]:
        options: dict[str, dict[str, str]] = {}
        for item in self.late_phase_options:
            key, sep, text = item.partition("=")
            kind, dot, name = (part.strip() for part in key.partition("."))
            if not (sep and dot and kind and name):
                raise LatePhaseError(f"--late-phase-options takes KIND.OPTION=VALUE items such as hypernet.rank=4, "
                                     f"got {item!r}")
            if name in options.get(kind, {}):
                raise LatePhaseError(f"--late-phase-options gives {kind}.{name} twice; keep one")
            options.setdefault(kind, {})[name] = text.strip()
        return check_kind_options(options, source="--late-phase-options")

    @property
    def optim_settings(self) -> OptimSettings:
        """The optimisation section of these settings (U_θ, U_φ, γθ, schedule, warm-up, SWA)."""
        return OptimSettings.of(self)

    @property
    def data_settings(self) -> DataSettings:
        """The data section of these settings: all that :func:`~lpconvert.data.build_data` reads."""
        return DataSettings.of(self)

    def _require(self, name: str, ok: bool, problem: str) -> None:
        if not ok:
            raise LatePhaseError(f"{flag(name)} {problem}, got {_shown(getattr(self, name))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """A config from a mapping (recipe, saved run); unknown keys are refused, values coerced or refused."""
        unknown = sorted(set(values) - set(field_types()))
        if unknown:
            raise LatePhaseError(f"unknown setting(s) {', '.join(unknown)}; see `lpconvert finetune --help`")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> FinetuneConfig:
        """A saved run's settings as it ran (not how it was resumed: no ``resume``, no ``force``): a setting the run
        was saved without has the value the version that saved it behaved as (:data:`LEGACY_SETTINGS`), not today's
        default."""
        return cls.from_dict({**LEGACY_SETTINGS, **values, "resume": None, "force": False})


def check_input_size(config: FinetuneConfig, model: nn.Module) -> None:
    """Refuse an ``--input-size C H W`` whose channels (or, for a model that starts with a linear layer, whose C·H·W
    values) the model's first layer does not take (:func:`~lpconvert.collapse.input_mismatch`), before anything is
    written or recorded."""
    problem = input_mismatch(model, config.input_size) if config.input_size else None
    if problem is not None:
        raise LatePhaseError(f"--input-size {' '.join(map(str, config.input_size))} does not fit {config.model} "
                             f"({problem}); it is C H W, channels first")


#: Settings that runs saved by earlier versions lack, with the value those versions behaved as.
LEGACY_SETTINGS = {"data_in_memory": "off", "val_split": 0.0}


#: The values allowed for each setting that has a fixed set (its field's ``choices``).
CHOICES: dict[str, tuple[str, ...]] = {f.name: f.metadata["choices"] for f in dataclasses.fields(FinetuneConfig)
                                       if "choices" in f.metadata}


def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def _is_device(value: str) -> bool:
    if value == "auto":
        return True
    try:
        return torch.device(value).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):
        return False


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` says: ints from integral numbers or digit strings, finite floats from numbers or
    numeric strings (YAML reads ``1e-3`` as a string), tuples from lists or comma-separated strings, a scalar as a
    1-tuple; anything else is refused naming the flag."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise LatePhaseError(f"{flag(name)} needs a value")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(name, v.strip() if isinstance(v, str) else v, item) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if hint in READERS:
        try:
            read = READERS[hint](value)
        except (ValueError, OverflowError):
            what = {bool: "true or false (or yes/no, 1/0)", int: "an integer", float: "a finite number"}[hint]
            raise LatePhaseError(f"{flag(name)} must be {what}, got {value!r}") from None
        return int(read) if name == "milestones" and float(read).is_integer() else read
    if hint is str:
        if isinstance(value, str):
            return value
        if name == "interpolate" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # α as a number (a recipe's `interpolate: 0.5`), read by soup.parse_alpha
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise LatePhaseError(f"{flag(name)} must be a text value, got {value!r}")
    return value
