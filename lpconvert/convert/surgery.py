"""Model surgery: discover the late-phase targets of any ``nn.Module`` and swap them in place by qualified name.

torch.fx is used to *discover and validate*, never to rebuild: the model is traced (with timm's notrace leaf modules
and autowrapped functions, every candidate layer kept as a leaf) in train and eval mode to find the classifier feeding
the output, layers called more than once and functional ``F.batch_norm``/``F.layer_norm`` calls that a module swap
would miss. Which modules a kind takes is the kind's own business (``lpconvert/layers/``, one file per kind, read
through the registry). The swap then happens on the original object, so the host keeps its class, methods and
attributes (``pretrained_cfg`` …) and every shared parameter keeps its name.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from lpconvert.convert.late_phase_config import ATTRIBUTE, LatePhaseConfig, LatePhaseTarget
from lpconvert.convert.members import set_submodule
from lpconvert.errors import LatePhaseError
from lpconvert.layers import KINDS, Discovery, LatePhaseLayer, MemberSelection, check_kind_options, resolve_kinds
from lpconvert.layers.discovery import matches
from lpconvert.layers.registry import module_types

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("batchnorm",)  # the paper's late-phase weights: convert, plan, inspect and finetune alike
_FUNCTIONAL_NORMS = {
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm,
    torch.batch_norm, torch.layer_norm, torch.group_norm, torch.instance_norm,
}


# --------------------------------------------------------------------------------------------------------------------
# discovery with torch.fx
# --------------------------------------------------------------------------------------------------------------------
class _DiscoveryTracer(fx.Tracer):
    """Keeps candidate layers and timm's notrace modules as leaves so they appear as ``call_module`` nodes."""

    def __init__(self, leaf_types: tuple[type, ...], notrace_modules: tuple[type, ...], autowrap: tuple) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.leaf_types = leaf_types
        self.notrace_modules = notrace_modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or isinstance(m, self.notrace_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    from timm.models import get_notrace_functions, get_notrace_modules

    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


@dataclass
class _Trace:
    calls: Counter = field(default_factory=Counter)  # qualified name -> call_module count
    functional: list[str] = field(default_factory=list)
    output_heads: list[str] = field(default_factory=list)


def _trace(model: nn.Module, training: bool) -> _Trace:
    notrace_modules, autowrap = _timm_notrace()
    tracer = _DiscoveryTracer(module_types(), notrace_modules, autowrap)
    was_training = model.training
    model.train(training)
    try:
        graph = tracer.trace(model)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    result = _Trace()
    for node in graph.nodes:
        if node.op == "call_module":
            result.calls[node.target] += 1
        elif node.op == "call_function" and node.target in _FUNCTIONAL_NORMS:
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else "the model's forward"
            result.functional.append(f"{node.target.__name__} in {where or 'the model forward'}")
    # the classifier: linear modules reached from the output through parameter-free operations only
    seen, frontier = set(), [n for n in graph.nodes if n.op == "output"]
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "call_module":
                if _is_head(modules.get(arg.target)):
                    result.output_heads.append(arg.target)
                elif not any(True for _ in modules[arg.target].parameters()):
                    frontier.append(arg)
            elif arg.op in ("call_function", "call_method"):
                frontier.append(arg)
    return result


# --------------------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What :func:`convert` would do to a model (see :func:`plan`)."""

    num_members: int
    kinds: tuple[str, ...]
    targets: list[LatePhaseTarget]  # in module order
    params_per_member: int
    model_params: int
    params_after: int  # the converted model's parameters (each shared tensor once)
    available: dict[str, int]  # kind -> layers of that kind in the model (before include/exclude)
    traced: bool
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    functional_calls: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    uncalled: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> dict[str, str]:
        """Qualified module name → kind, in module order."""
        return {name: target.kind for target in self.targets for name in target.modules}

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.layers.values()))

    def warn(self, stacklevel: int = 2) -> None:
        """Warn about what converting this plan will not do as the model does: the plan's warnings, and functional
        norm calls that stay shared. `stacklevel` counts from the caller of this method, as in ``warnings.warn``:
        the default 2 names the line that called the function calling ``warn`` (for :func:`convert`, its caller)."""
        for message in self.warnings:
            warnings.warn(message, stacklevel=stacklevel + 1)
        if self.functional_calls:
            warnings.warn(
                f"{len(self.functional_calls)} functional norm call(s) stay shared (a module swap cannot reach them): "
                + "; ".join(self.functional_calls[:3]),
                stacklevel=stacklevel + 1,
            )

    def late_phase_config(self, sigma0: float, seed: int | None) -> LatePhaseConfig:
        """The :class:`~lpconvert.convert.late_phase_config.LatePhaseConfig` that converts this plan's targets, members
        initialised by Eq. 2 with σ0 = `sigma0` from `seed`."""
        return LatePhaseConfig(self.num_members, self.targets, float(sigma0), seed, self.options)

    @property
    def fraction(self) -> float:
        """Late-phase parameters of one member as a fraction of the original model's parameters."""
        return self.params_per_member / max(self.model_params, 1)

    def __str__(self) -> str:
        lines = [f"late-phase plan: K={self.num_members}, targets={','.join(self.kinds)}"]
        for kind, count in self.counts().items():
            lines.append(f"  {kind:<11} {count:>4} layers")
        lines.append(
            f"  late-phase parameters per member: {self.params_per_member:,} "
            f"({100 * self.fraction:.3f}% of {self.model_params:,}); "
            f"after conversion {self.params_after:,} parameters"
        )
        if not self.traced:
            lines.append("  torch.fx could not trace the model: layers were found by type only")
        for title, items in (
            ("functional norm calls a module swap misses", self.functional_calls),
            ("layers called more than once per forward", self.reused),
            ("target layers never called by forward", self.uncalled),
            ("notes", self.notes),
            ("warnings", self.warnings),
        ):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines.extend(f"    - {item}" for item in items[:10])
                if len(items) > 10:
                    lines.append(f"    … and {len(items) - 10} more")
        return "\n".join(lines)


def _as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _is_head(module: nn.Module | None) -> bool:
    """A layer that can produce the logits: linear, or a 1×1 convolution followed by pooling (SqueezeNet)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def _find_classifier(model: nn.Module, traces: list[_Trace], modules: dict[str, nn.Module]) -> str | None:
    """The classifier: timm's ``get_classifier()``, else the one head that torch.fx finds feeding the output through
    parameter-free operations, else (untraceable models) the last linear layer."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if _is_head(head):
            return next(name for name, m in modules.items() if m is head)
    for trace in traces:
        if len(set(trace.output_heads)) == 1:
            return trace.output_heads[0]
    if not traces:
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None
    return None


def _traces(model: nn.Module) -> tuple[list[_Trace], list[str]]:
    """The model traced in train and eval mode, or no trace (and why) when torch.fx cannot follow it."""
    traces = []
    for training in (True, False):
        try:
            traces.append(_trace(model, training))
        except Exception as exc:  # fx fails on data-dependent control flow and friends
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return [], [
                f"torch.fx could not trace {type(model).__name__} in {'train' if training else 'eval'} mode "
                f"({reason}); converting by module type, so functional norm calls and the classifier position were "
                "not checked"
            ]
    return traces, []


def _targets(model: nn.Module, modules: dict[str, nn.Module], classifier: str | None, kinds: Sequence[str],
             include: list[str], exclude: list[str], options: dict[str, dict[str, Any]]
             ) -> tuple[list[LatePhaseTarget], dict[str, int]]:
    """Every kind in registry order (decreasing precedence) looks for its targets (a module an earlier kind took is
    not offered to a later one): what the selected kinds take, in module order, and how many layers each kind would
    take if it were the only one asked for (what ``--late-phase KIND`` converts)."""
    order = {name: i for i, name in enumerate(modules)}
    chosen = Discovery(model, modules, classifier, include=include, exclude=exclude, options=options)
    available: dict[str, int] = {}
    found: list[LatePhaseTarget] = []
    for kind, cls in KINDS.items():
        groups = cls.targets(Discovery(model, modules, classifier, options=options))
        if groups:
            available[kind] = sum(len(group) for group in groups)
        if kind in kinds:
            groups = cls.targets(chosen)
            chosen.claimed.update(name for group in groups for name in group)
            found += [LatePhaseTarget(kind, tuple(group)) for group in groups]
    offered = [name for kind in kinds
               for group in KINDS[kind].targets(Discovery(model, modules, classifier, options=options)) for name in group]
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(matches(name, [pattern]) for name in offered):
                raise LatePhaseError(f"{flag} pattern {pattern!r} matches no {'/'.join(kinds)} layer")
    return sorted(found, key=lambda target: order[target.modules[0]]), available


def plan(
    model: nn.Module,
    K: int = 10,
    targets: str | Iterable[str] = DEFAULT_TARGETS,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> Plan:
    """Report what :func:`convert` would replace, without changing `model`.

    Every registered kind looks for its targets in registry order, by decreasing ``precedence`` (a module an earlier
    kind took is not offered to a later one); `include`/`exclude` glob patterns on qualified names narrow the modules
    offered; `options` are per-kind options (``{"rank1": {"input_weights": True}}``), checked against the kinds'
    declared options; the plan's ``options`` hold every option of the converted kinds, defaults filled in.

    >>> print(lpconvert.plan(timm.create_model("resnet50"), K=10))
    """
    _check_members(K)
    kinds = resolve_kinds(targets)
    include, exclude, given = _as_patterns(include), _as_patterns(exclude), _options(options, kinds)
    options = {kind: values for kind in kinds if (values := KINDS[kind].option_values(given.get(kind, {})))}
    modules = dict(model.named_modules())
    if any(isinstance(m, LatePhaseLayer) for m in modules.values()):
        raise LatePhaseError("this model is already late-phase (converted); collapse it before converting again")

    traces, warn = _traces(model)
    classifier = _find_classifier(model, traces, modules)
    if "classifier" in kinds and classifier is None:
        warn.append("no classifier (a linear or 1×1-convolution layer feeding the output) was found")
    found, available = _targets(model, modules, classifier, kinds, include, exclude, options)
    _refuse_inapplicable(given, found, modules)

    calls: Counter = Counter()
    functional: list[str] = []
    for trace in traces:
        for name, count in trace.calls.items():
            calls[name] = max(calls[name], count)
        functional.extend(f for f in trace.functional if f not in functional)
    layers = [name for target in found for name in target.modules]
    notes = [note for t in found
             for note in KINDS[t.kind].check([modules[n] for n in t.modules], options.get(t.kind, {}))]
    model_params = sum(p.numel() for p in model.parameters())
    return Plan(
        num_members=K,
        kinds=kinds,
        targets=found,
        params_per_member=sum(KINDS[t.kind].member_parameters([modules[n] for n in t.modules], options.get(t.kind, {}))
                              for t in found),
        options=options,
        model_params=model_params,
        params_after=model_params + sum(
            KINDS[t.kind].added_parameters([modules[n] for n in t.modules], K, options.get(t.kind, {})) for t in found),
        available=available,
        traced=bool(traces),
        functional_calls=functional,
        reused=[n for n in layers if calls[n] > 1],
        uncalled=[n for n in layers if traces and calls[n] == 0],
        warnings=warn,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------------
def _options(options: dict[str, dict[str, Any]] | None, kinds: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per-kind options checked and converted by the kinds' declarations, for kinds that are converted (an option for
    another kind is a mistake worth a message)."""
    options = check_kind_options(options)
    unused = [kind for kind in options if kind not in kinds]
    if unused:
        raise LatePhaseError(f"options given for {', '.join(unused)}, which is not converted (targets: {', '.join(kinds)})")
    return options


def _refuse_inapplicable(given: dict[str, dict[str, Any]], found: Sequence[LatePhaseTarget],
                         modules: dict[str, nn.Module]) -> None:
    """Refuse an option given for layers that the kind does not convert here (rank-1's ``input_weights`` on a model
    without a recurrent layer): it would silently do nothing."""
    for kind, values in given.items():
        layers = [modules[name] for target in found if target.kind == kind for name in target.modules]
        for name in values:
            spec = KINDS[kind].option_specs[name]
            if not spec.applies(layers):
                concerned = "/".join(t.__name__ for t in spec.applies_to)
                raise LatePhaseError(f"late-phase options: {kind}.{name} concerns {concerned} layers, but none of the "
                                     f"{kind} layers here ({len(layers)}) is one; drop the option")


def _check_members(K: object) -> None:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise LatePhaseError(f"K (the number of late-phase members) must be an integer >= 1, got {K!r}")


def convert(
    model: nn.Module,
    K: int = 10,
    targets: str | Iterable[str] = DEFAULT_TARGETS,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    sigma0: float = 0.0,
    seed: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """Turn `model` into its late-phase form at T0 = its current weights, in place, and return it.

    Each target layer becomes a late-phase layer with K members initialised by Eq. 2,
    φ_k = φ0 + σ0 · ‖φ0‖/√D · ε_k (σ0 = 0: identical members, the output is unchanged). `targets` are kinds
    (``batchnorm``, ``classifier``, ``layernorm``, ``groupnorm``, ``rank1``, ``hypernet``: the registry's
    :data:`~lpconvert.layers.KINDS`; aliases ``bn``, ``norm``, ``head``);
    `include`/`exclude` are glob patterns on qualified names (``"layer4.*"``); `options` per-kind options
    (``{"rank1": {"input_weights": True}}``: also the input-to-hidden matrices of recurrent layers). The result carries its
    :class:`~lpconvert.convert.late_phase_config.LatePhaseConfig` as ``model.late_phase_config``. All-or-nothing: on any error
    the model is left as it was.

    >>> model = lpconvert.convert(timm.create_model("resnet50", pretrained=True), K=10)
    """
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not 0 <= sigma0 < float("inf"):
        raise LatePhaseError(f"sigma0 must be a finite number >= 0, got {sigma0!r}")
    report = plan(model, K, targets, include=include, exclude=exclude, options=options)
    report.warn()
    if not report.targets:
        raise LatePhaseError(nothing_to_convert(model, report))
    return convert_from_config(model, report.late_phase_config(sigma0, seed))


def convert_from_config(model: nn.Module, config: LatePhaseConfig) -> nn.Module:
    """Inject the late-phase layers of `config` into `model` by their exact names, in place, without tracing (how a
    saved late-phase model is rebuilt). Members are initialised by Eq. 2 from ``config.sigma0`` and ``config.seed``."""
    if any(isinstance(m, LatePhaseLayer) for m in model.modules()):
        raise LatePhaseError("this model is already late-phase (converted); collapse it before converting again")
    _check_members(config.K)
    options = check_kind_options(config.options)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    selection = MemberSelection(config.K)
    replacements: dict[str, LatePhaseLayer] = {}
    for target in config.targets:
        if target.kind not in KINDS:
            raise LatePhaseError(f"unknown late-phase kind {target.kind!r}; this lpconvert knows {', '.join(KINDS)}")
        try:
            modules = [model.get_submodule(name) for name in target.modules]
        except AttributeError as err:
            raise LatePhaseError(f"the model has no layer {target.modules}: {err}; it is not the converted one") from err
        layers = KINDS[target.kind].build(modules, config.K, selection, config.sigma0, generator,
                                          KINDS[target.kind].option_values(options.get(target.kind, {})))
        replacements.update(zip(target.modules, layers))
    # every replacement is built before the first swap, so a failure above leaves the model untouched
    for name, layer in replacements.items():
        set_submodule(model, name, layer)
    setattr(model, ATTRIBUTE, config)
    logger.debug("converted %d layers to K=%d late-phase layers", len(replacements), config.K)
    return model


def plan_or_refuse(model: nn.Module, K: int, targets: str | Iterable[str], *, include: Sequence[str] | None,
                   exclude: Sequence[str] | None, options: dict[str, dict[str, Any]] | None) -> Plan:
    """:func:`plan`, refusing a plan with nothing to convert with the one message `inspect` and `finetune` share."""
    report = plan(model, K, targets, include=include, exclude=exclude, options=options)
    if not report.targets:
        raise LatePhaseError(nothing_to_convert(model, report))
    return report


def nothing_to_convert(model: nn.Module, report: Plan) -> str:
    """What the model has instead, and the late-phase targets that would work."""
    name = type(model).__name__
    if report.available.keys() & set(report.kinds):  # the kinds are there: include/exclude removed every layer
        return f"include/exclude patterns left no {'/'.join(report.kinds)} layer of {name} to convert; widen them"
    present = ", ".join(f"{k} ({report.available[k]})" for k in KINDS if k in report.available)
    if not present:
        return f"{name} has no layer that lpconvert can make late-phase (no norm, linear or convolution layer)"
    norms = [k for k in ("batchnorm", "layernorm", "groupnorm") if k in report.available]
    heads = ["classifier"] if "classifier" in report.available else []
    suggestion = ",".join(norms + heads) or "rank1"
    return (
        f"{name} has no {'/'.join(report.kinds)} layers to convert; kinds present: {present}; "
        f"use those as late-phase weights, e.g. targets={suggestion!r} (--late-phase {suggestion})"
    )
