"""One prepared GPU check of lpconvert's speed, memory, torch.compile behaviour and exactness (issue #13).

How to run on a GPU (one H100/H200, under 8 minutes, synthetic inputs: nothing to upload or download)::

    python scripts/device_check.py --out device_check.json

It writes ONE JSON file (rewritten after every measurement, so a killed run still leaves what it had) and prints a
summary table. Every ratio in it compares two figures measured in the same process on the same model and batches:

- ``throughput``: images/s at 224 px (bf16 autocast, channels_last on CUDA) of plain fine-tuning (one SGD step per
  minibatch) and late-phase fine-tuning (K = 10 late-phase BatchNorm, ``LatePhaseEngine`` over K minibatches per
  step; sequential, and vectorized where ``lpconvert finetune --mode auto`` would stack the minibatches) for
  resnet50, resnet152 and densenet161; the modes alternate over rounds (ABBA) so that drift does not favour one;
- ``vectorized_32px``: vectorized vs sequential (and plain) at 32 px;
- ``peak_memory``: the peak GPU memory of late-phase over plain, each as if trained alone (null on a CPU);
- ``compile``: ``torch.compile`` (inductor) of the converted model driven by the engine (sequential): the time of
  the first (compiling) iteration, step time after warm-up against eager, recompilations and graph breaks. Shapes
  are fixed and the member is a tensor, so one graph should serve all K members: the first recompilation stops the
  section (recorded with its reason) rather than compiling once per member for minutes;
- ``exactness``: vectorized vs sequential engine from the same start in float32 (TF32 off): the largest absolute
  difference over every parameter and buffer after a few iterations;
- ``checks`` (each ratio against the issue's target), ``skipped`` (parts left out by the time budget or not
  applicable), ``errors``, and the environment (torch, timm, device, git commit).

``--tiny`` runs every section on the CPU with tiny models in seconds (the test suite runs it so that the script
cannot rot); its figures say nothing about speed. ``--budget-s`` (default 450 s) stops starting new measurements once
spent; the parts not measured are listed under ``skipped``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

import lpconvert  # noqa: E402
from lpconvert.train.optim import VECTORIZE_MAX_PIXELS  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import bench_finetune as bench  # noqa: E402  (scripts/ is not a package: its timing helpers are reused as they are)

# `lpconvert finetune --mode auto` stacks the K minibatches when K·B·H·W stays at or below this: "vectorized where
# it applies"
AUTO_VECTORIZE_MAX_PIXELS = VECTORIZE_MAX_PIXELS

TARGETS = {
    "late_phase_over_plain_min": 1.00,  # paper, Table 17: 0.997
    "vectorized_over_sequential_32px_min": 5.0,
    "peak_memory_over_plain_max": 1.05,
}

# the full check (one H100/H200) and the CPU smoke run of the test suite
PROFILES = {
    "gpu": dict(
        K=10, models="resnet50,resnet152,densenet161", size=224, batch=256, warmup=2, steps=3, rounds=2,
        vec_model="cifar_resnet20", vec_size=32, vec_batch=128, vec_warmup=3, vec_steps=10,
        compile_model="resnet50", compile_size=224, compile_batch=128, compile_warmup=2, compile_steps=3,
        compile_backend="inductor",
        exact_model="resnet50", exact_size=128, exact_batch=8, exact_steps=3,
        min_left_s=20.0, compile_min_left_s=120.0, exact_tol=1e-4,
    ),
    "tiny": dict(
        K=4, models="test_resnet", size=32, batch=4, warmup=1, steps=1, rounds=2,
        vec_model="cifar_resnet20", vec_size=32, vec_batch=4, vec_warmup=1, vec_steps=1,
        compile_model="digits_cnn", compile_size=8, compile_batch=4, compile_warmup=1, compile_steps=1,
        compile_backend="eager",
        exact_model="test_resnet", exact_size=64, exact_batch=8, exact_steps=2,
        min_left_s=0.0, compile_min_left_s=0.0, exact_tol=1e-5,
    ),
}
SECTIONS = ("exactness", "vectorized_32px", "throughput", "compile")


# -- bookkeeping ------------------------------------------------------------------------------------------------------
class Report:
    """The JSON document, written atomically after every measurement."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.budget_s = budget_s
        self.data: dict = {"complete": False, "skipped": [], "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - _START

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def allows(self, part: str, need_s: float) -> bool:
        """Whether `part` may start: at least `need_s` seconds of the budget are left (else it is recorded)."""
        if self.left() >= need_s and self.left() > 0:
            return True
        self.skip(part, f"time budget: {max(self.left(), 0.0):.0f} s of {self.budget_s:.0f} s left, "
                        f"needs about {need_s:.0f} s")
        return False

    def skip(self, part: str, reason: str) -> None:
        self.data["skipped"].append({"part": part, "reason": reason})

    def error(self, part: str, exc: BaseException) -> None:
        self.data["errors"].append({"part": part, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                    "traceback": traceback.format_exc()[-4000:]})

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


def _finite(x: float | None) -> float | None:
    """JSON has no NaN/inf: such a figure is recorded as null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=SCRIPTS.parent, capture_output=True, text=True, timeout=10,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # read-only: never touch the index
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lpconvert": lpconvert.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{platform.processor() or platform.machine()} CPU",
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


# -- measuring --------------------------------------------------------------------------------------------------------
def _memory_format(cfg) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _inputs(cfg, device, size: int, batch: int, count: int, channels: int = 3):
    """`count` synthetic minibatches (the same for every mode) of 1000-class labels, already on the device."""
    if channels == 3:
        return bench._batches(SimpleNamespace(batch=batch, channels_last=cfg.channels_last), device, size, count)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=_memory_format(cfg))
          for _ in range(count)]
    return xs, [torch.randint(0, 1000, (batch,), generator=g).to(device) for _ in range(count)]


def _channels(model) -> int:
    return getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _make_step(mode: str, model, cfg, device):
    """A step ``(xs, ys)`` over K minibatches: plain (one SGD step per minibatch), plain-stacked (one SGD step on
    the K minibatches at once) or late-phase (K = cfg.K, Algorithm 1 in `mode`)."""
    args = SimpleNamespace(amp_dtype=cfg.amp_dtype)
    if mode.startswith("plain"):
        return bench.plain_step(model, args, device, stacked=mode == "plain-stacked")
    return bench.late_phase_step(model, args, device, mode)


def compare_modes(name: str, size: int, batch: int, modes: list[str], cfg, device, warmup: int, steps: int,
                  rounds: int) -> dict:
    """Images/s and peak memory of each mode on the same model (random init), inputs and device.

    The modes alternate over `rounds` (forward, then backward order: A B B A), each timing `steps` iterations of K
    minibatches, after `warmup` untimed ones in the first round; images/s = all timed images / all timed seconds.

    Peak memory (CUDA) is that of a process training the mode alone: the shared inputs + what the mode keeps between
    steps (weights, gradients, optimizer state: allocated after its first round minus before it was built) + the
    most a step adds on top, measured in the second round (the first with ``--rounds 1``), when cuDNN's
    benchmarking (workspaces) is over for every mode. The other modes' models stay resident meanwhile; they count in neither figure."""
    fmt = _memory_format(cfg)
    cuda = device.type == "cuda"
    base = timm.create_model(name, num_classes=1000)
    xs, ys = _inputs(cfg, device, size, batch, cfg.K)
    input_bytes = sum(t.numel() * t.element_size() for t in xs + ys)
    out: dict = {"model": name, "size": size, "batch": batch, "K": cfg.K, "warmup": warmup, "steps": steps,
                 "rounds": rounds, "modes": {}}
    live, images, seconds, kept, transient = {}, {}, {}, {}, {}
    converted = None
    for mode in modes:
        pixels = cfg.K * batch * size * size
        if mode == "vectorized" and pixels > cfg.vectorized_max_pixels:
            out["modes"][mode] = {"skipped": f"K·B·H·W = {pixels} > {cfg.vectorized_max_pixels}: "
                                             "--mode auto runs sequential here"}
            continue
        if mode.startswith("plain"):
            model = copy.deepcopy(base)
        else:  # converted once (torch.fx tracing), copied per mode
            converted = converted or lpconvert.convert(copy.deepcopy(base), K=cfg.K, targets="batchnorm")
            model = copy.deepcopy(converted)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = _allocated(device)
        model = model.to(device=device, memory_format=fmt).train()
        try:
            step = _make_step(mode, model, cfg, device)
        except lpconvert.LatePhaseError as exc:  # e.g. vectorized with a shared BatchNorm
            out["modes"][mode] = {"skipped": f"not applicable: {exc}"}
            continue
        rate = bench._timed(step, bench._repeat(xs, ys, warmup + steps), device, warmup)
        kept[mode] = _allocated(device) - before
        transient[mode] = torch.cuda.max_memory_allocated(device) - before - kept[mode] if cuda else 0
        live[mode] = step
        images[mode], seconds[mode] = [batch * cfg.K * steps], [batch * cfg.K * steps / rate]
        out["modes"][mode] = {}
        del model
    order = list(live)
    for r in range(1, rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            if cuda and r == 1:
                torch.cuda.reset_peak_memory_stats(device)
                at_start = _allocated(device)
            rate = bench._timed(live[mode], bench._repeat(xs, ys, steps), device, 0)
            if cuda and r == 1:
                transient[mode] = torch.cuda.max_memory_allocated(device) - at_start
            images[mode].append(batch * cfg.K * steps)
            seconds[mode].append(batch * cfg.K * steps / rate)
    for mode in order:
        out["modes"][mode]["img_s"] = _finite(sum(images[mode]) / sum(seconds[mode]))
        out["modes"][mode]["img_s_rounds"] = [_finite(i / s) for i, s in zip(images[mode], seconds[mode])]
        out["modes"][mode]["peak_gib"] = round((input_bytes + kept[mode] + transient[mode]) / 2**30, 4) if cuda \
            else None
    del live
    if cuda:
        torch.cuda.empty_cache()
    return out


def _ratio(modes: dict, a: str, b: str, key: str) -> float | None:
    x, y = modes.get(a, {}).get(key), modes.get(b, {}).get(key)
    return _finite(x / y) if x is not None and y else None


def throughput(report: Report, cfg, device) -> None:
    results = report.data.setdefault("throughput", {})
    memory = report.data.setdefault("peak_memory", {})
    for name in cfg.models:
        part = f"throughput/{name}"
        if not report.allows(part, cfg.min_left_s):
            continue
        batch, result = cfg.batch, None
        while result is None:
            out_of_memory = False
            try:
                result = compare_modes(name, cfg.size, batch, ["plain", "sequential", "vectorized"], cfg, device,
                                       cfg.warmup, cfg.steps, cfg.rounds)
            except torch.cuda.OutOfMemoryError as exc:  # halve the batch, down to 32
                out_of_memory = batch > 32
                if not out_of_memory:
                    report.error(part, exc)
            except Exception as exc:  # noqa: BLE001  (one failing model must not cost the others)
                report.error(part, exc)
            if device.type == "cuda":
                gc.collect()  # the failed attempt's models, freed with its traceback
                torch.cuda.empty_cache()
            if not out_of_memory:
                break
            report.skip(part, f"batch {batch} ran out of memory; retried with {batch // 2}")
            batch //= 2
        if result is None:
            continue
        measured = [m for m in ("sequential", "vectorized") if "img_s" in result["modes"].get(m, {})]
        result["late_phase_over_plain"] = {m: _ratio(result["modes"], m, "plain", "img_s") for m in measured}
        result["peak_memory_over_plain"] = {m: _ratio(result["modes"], m, "plain", "peak_gib") for m in measured}
        results[name] = result
        memory[name] = result["peak_memory_over_plain"] if device.type == "cuda" else None
        report.write()


def vectorized_32px(report: Report, cfg, device) -> None:
    part = "vectorized_32px"
    if not report.allows(part, cfg.min_left_s):
        return
    try:
        result = compare_modes(cfg.vec_model, cfg.vec_size, cfg.vec_batch,
                               ["plain", "sequential", "vectorized", "plain-stacked"], cfg, device,
                               cfg.vec_warmup, cfg.vec_steps, cfg.rounds)
    except Exception as exc:  # noqa: BLE001
        report.error(part, exc)
        return
    modes = result["modes"]
    result["vectorized_over_sequential"] = _ratio(modes, "vectorized", "sequential", "img_s")
    result["vectorized_over_plain"] = _ratio(modes, "vectorized", "plain", "img_s")
    result["vectorized_over_plain_stacked"] = _ratio(modes, "vectorized", "plain-stacked", "img_s")
    result["peak_memory_over_plain"] = {m: _ratio(modes, m, "plain", "peak_gib") for m in ("sequential", "vectorized")}
    report.data[part] = result
    report.write()


class RecompileCounter(logging.Handler):
    """Counts dynamo's recompilations through its ``recompiles`` log artifact (one record per recompilation,
    with the guard failures that caused it)."""

    LOGGER = "torch._dynamo.guards.__recompiles"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage())

    @contextlib.contextmanager
    def installed(self):
        import torch._logging

        torch._logging.set_logs(recompiles=True)
        logger = logging.getLogger(self.LOGGER)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            torch._logging.set_logs()

    @property
    def count(self) -> int:
        return len(self.reasons)


def compile_check(report: Report, cfg, device) -> None:
    """The converted model under torch.compile driven by the engine (sequential: member k on minibatch k), against
    the same model eager. The member is chosen by a tensor, so one graph should serve all K members: with fixed
    shapes any recompilation is a defect. Dynamo runs with ``error_on_recompile``, so that the first recompilation
    stops the section (recorded with its reason) instead of compiling again per member and eating the budget."""
    part = "compile"
    if not report.allows(part, cfg.compile_min_left_s):
        return
    import torch._dynamo
    from torch._dynamo.utils import counters

    fmt = _memory_format(cfg)
    name, size, batch, K = cfg.compile_model, cfg.compile_size, cfg.compile_batch, cfg.K
    factory = partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    result: dict = {"model": name, "size": size, "batch": batch, "K": K, "mode": "sequential",
                    "backend": cfg.compile_backend, "warmup": cfg.compile_warmup, "steps": cfg.compile_steps,
                    "error_on_recompile": True, "stopped": None, "first_step_s": None, "step_s": None, "img_s": None,
                    "recompiles_after_warmup": None}
    rate = None
    try:
        base = timm.create_model(name, num_classes=1000)
        xs, ys = _inputs(cfg, device, size, batch, K, _channels(base))
        torch._dynamo.reset()
        counters.clear()
        counter = RecompileCounter()
        model = lpconvert.convert(copy.deepcopy(base), K=K, targets="batchnorm").to(device=device, memory_format=fmt)
        compiled = torch.compile(model.train(), backend=cfg.compile_backend)
        engine = lpconvert.LatePhaseEngine(compiled, factory, mode="sequential", autocast_dtype=cfg.amp_dtype)
        phase = "first"
        with counter.installed(), torch._dynamo.config.patch(error_on_recompile=True):
            try:
                bench._sync(device)
                start = time.perf_counter()
                engine.step(xs, ys)
                bench._sync(device)
                result["first_step_s"] = round(time.perf_counter() - start, 3)
                phase = "warm-up"
                for _ in range(cfg.compile_warmup - 1):
                    engine.step(xs, ys)
                phase, after_warmup = "timed", counter.count
                rate = bench._timed(engine.step, bench._repeat(xs, ys, cfg.compile_steps), device, 0)
                result["recompiles_after_warmup"] = counter.count - after_warmup
            except torch._dynamo.exc.RecompileError:
                result["stopped"] = f"recompilation in the {phase} iteration (see recompile_reasons)"
        result["recompiles"] = counter.count
        result["recompile_reasons"] = [reason[:600] for reason in counter.reasons[:3]]
        result["frames_compiled"] = int(counters["frames"].get("total", 0))
        result["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        result["graph_breaks"] = int(sum(counters["graph_break"].values()))
        if rate is not None:
            result["step_s"], result["img_s"] = _finite(batch * K / rate), _finite(rate)
        del engine, compiled, model
        torch._dynamo.reset()
        report.data[part] = result
        report.write()

        eager = lpconvert.convert(copy.deepcopy(base), K=K, targets="batchnorm").to(device=device, memory_format=fmt)
        engine = lpconvert.LatePhaseEngine(eager.train(), factory, mode="sequential", autocast_dtype=cfg.amp_dtype)
        eager_rate = bench._timed(engine.step, bench._repeat(xs, ys, cfg.compile_warmup + cfg.compile_steps), device,
                                  cfg.compile_warmup)
        result["eager_step_s"] = _finite(batch * K / eager_rate)
        result["compiled_over_eager"] = None if rate is None else _finite(rate / eager_rate)
        del engine, eager
    except Exception as exc:  # noqa: BLE001
        report.error(part, exc)
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "recompiles" in result:
        report.data[part] = result
    report.write()


@contextlib.contextmanager
def strict_float32(device):
    """float32 without TF32 and with deterministic cuDNN algorithms, restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def exactness(report: Report, cfg, device) -> None:
    """Vectorized and sequential engines from the same start (members spread by σ0 > 0, so that a member given
    another member's slice would show), float32, the same minibatches: every parameter and buffer compared."""
    part = "exactness"
    if not report.allows(part, cfg.min_left_s):
        return
    K, size, batch = cfg.K, cfg.exact_size, cfg.exact_batch
    try:
        with strict_float32(device):
            torch.manual_seed(0)
            start = lpconvert.convert(timm.create_model(cfg.exact_model, num_classes=10), K=K,
                                      targets=("batchnorm", "classifier"), sigma0=0.5, seed=0).train()
            g = torch.Generator().manual_seed(1)
            data = [([torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(K)],
                     [torch.randint(0, 10, (batch,), generator=g).to(device) for _ in range(K)])
                    for _ in range(cfg.exact_steps)]
            factory = partial(torch.optim.SGD, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
            states, losses = {}, {}
            for mode in ("sequential", "vectorized"):
                model = copy.deepcopy(start).to(device)
                engine = lpconvert.LatePhaseEngine(model, factory, mode=mode)
                losses[mode] = torch.stack([engine.step(xs, ys) for xs, ys in data]).double().cpu()
                states[mode] = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
                del engine, model
        initial = {k: v.detach().double() for k, v in start.state_dict().items()}
        floating = {k for k, v in start.state_dict().items() if v.is_floating_point()}
        diffs, max_update, over_update = {}, 0.0, 0.0
        for key, a in states["sequential"].items():
            if not a.numel():
                continue
            diffs[key] = (a - states["vectorized"][key]).abs().max().item()
            update = (a - initial[key]).abs().max().item() if key in floating else 0.0  # not step counters
            max_update = max(max_update, update)
            if update > 0:
                over_update = max(over_update, diffs[key] / update)
        worst = max(diffs, key=diffs.get)
        max_abs = diffs[worst]
        tol = cfg.exact_tol
        report.data[part] = {
            "model": cfg.exact_model, "size": size, "batch": batch, "K": K, "steps": cfg.exact_steps,
            "dtype": "float32", "tf32": False, "targets": ["batchnorm", "classifier"], "sigma0": 0.5, "lr": 0.01,
            "tensors_compared": len(diffs),
            "max_abs_diff": max_abs, "worst_tensor": worst, "max_diff_over_update": over_update,
            "loss_max_abs_diff": (losses["sequential"] - losses["vectorized"]).abs().max().item(),
            "max_abs_update": max_update,  # how far the weights moved: the comparison is not vacuous
            "tolerance": tol, "passed": bool(max_abs <= tol),
        }
    except Exception as exc:  # noqa: BLE001
        report.error(part, exc)
    report.write()


# -- summary ----------------------------------------------------------------------------------------------------------
def checks(data: dict, device) -> list[dict]:
    out = []

    def add(name, value, target, ok):
        out.append({"check": name, "value": value, "target": target, "passed": None if value is None else ok})

    for model, result in data.get("throughput", {}).items():
        for mode, ratio in result["late_phase_over_plain"].items():
            target = TARGETS["late_phase_over_plain_min"]
            add(f"{model} late-phase {mode} / plain img/s", ratio, f">= {target}",
                ratio is not None and ratio >= target)
        if device.type == "cuda":
            ratio = result["peak_memory_over_plain"].get("sequential")
            target = TARGETS["peak_memory_over_plain_max"]
            add(f"{model} peak memory sequential / plain", ratio, f"<= {target}", ratio is not None and ratio <= target)
    vec = data.get("vectorized_32px")
    if vec:
        target = TARGETS["vectorized_over_sequential_32px_min"]
        ratio = vec["vectorized_over_sequential"]
        add(f"{vec['model']} {vec['size']} px vectorized / sequential img/s", ratio, f">= {target}",
            ratio is not None and ratio >= target)
    if "compile" in data:
        n = data["compile"]["recompiles"]
        add("compile: recompilations (fixed shapes, K members)", n, "== 0", n == 0)
    if "exactness" in data:
        e = data["exactness"]
        add("vectorized vs sequential max abs diff (float32)", e["max_abs_diff"], f"<= {e['tolerance']}", e["passed"])
    return out


def summary(data: dict) -> str:
    lines = [f"device: {data['environment']['device_name']}, torch {data['environment']['torch']}, "
             f"timm {data['environment']['timm']}, commit {data['environment']['git_commit']}", "",
             "| model | input | batch | plain img/s | sequential img/s | seq / plain | vectorized img/s | vec / plain "
             "| peak mem seq / plain |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(x, spec=".1f"):
        return "—" if x is None else format(x, spec)

    rows = list(data.get("throughput", {}).values())
    if data.get("vectorized_32px"):
        rows.append(data["vectorized_32px"])
    for r in rows:
        m = r["modes"]
        lines.append(
            f"| {r['model']} | {r['size']} px | {r['batch']} | {fmt(m.get('plain', {}).get('img_s'))} | "
            f"{fmt(m.get('sequential', {}).get('img_s'))} | {fmt(_ratio(m, 'sequential', 'plain', 'img_s'), '.3f')} | "
            f"{fmt(m.get('vectorized', {}).get('img_s'))} | {fmt(_ratio(m, 'vectorized', 'plain', 'img_s'), '.3f')} | "
            f"{fmt(_ratio(m, 'sequential', 'plain', 'peak_gib'), '.3f')} |")
    if data.get("compile"):
        c = data["compile"]
        lines += ["", f"compile ({c['backend']}, {c['model']} {c['size']} px, batch {c['batch']}): step "
                      f"{fmt(c.get('step_s'), '.3f')} s (eager {fmt(c.get('eager_step_s'), '.3f')} s), first step "
                      f"{fmt(c['first_step_s'], '.1f')} s, recompilations {c['recompiles']}, graph breaks "
                      f"{c['graph_breaks']}" + (f" — stopped: {c['stopped']}" if c["stopped"] else "")]
    if data.get("exactness"):
        e = data["exactness"]
        lines += ["", f"exactness ({e['model']}, float32, {e['steps']} iterations): max abs diff "
                      f"{e['max_abs_diff']:.3g} ({e['worst_tensor']}); weights and statistics moved by up to "
                      f"{e['max_abs_update']:.3g}"]
    lines += [""] + [f"{'PASS' if c['passed'] else 'FAIL' if c['passed'] is False else 'n/a '}  {c['check']}: "
                     f"{fmt(c['value'], '.4g')} (target {c['target']})" for c in data.get("checks", [])]
    lines += [f"skipped: {s['part']}: {s['reason']}" for s in data["skipped"]]
    lines += [f"ERROR: {e['part']}: {e['error']}" for e in data["errors"]]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_check.json", help="The JSON file to write.")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny models (the test suite's).")
    parser.add_argument("--device", default=None, help="[default: cuda if available, cpu with --tiny]")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="Start no new measurement once this many seconds (from process start) are spent.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {SECTIONS}.")
    parser.add_argument("--amp", choices=["bf16", "off"], default=None, help="[default: bf16 on CUDA, off on CPU]")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="[default: on CUDA]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads [default: torch's own; --tiny: 1, steadier on a shared machine]")
    parser.add_argument("--vectorized-max-pixels", type=int, default=AUTO_VECTORIZE_MAX_PIXELS,
                        help="Measure vectorized only where K·B·H·W is at most this (--mode auto's rule).")
    profile = PROFILES["gpu"]
    for key, value in profile.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                            help=f"[default: {value}; --tiny: {PROFILES['tiny'][key]}]")
    args = parser.parse_args(argv)
    chosen = PROFILES["tiny" if args.tiny else "gpu"]
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m for m in args.models.split(",") if m]
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.threads or args.tiny:
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    args.amp_dtype = torch.bfloat16 if amp == "bf16" else None
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    report = Report(Path(args.out), args.budget_s)
    settings = {k: v for k, v in vars(args).items() if k not in ("amp_dtype", "out")}
    report.data.update(environment=environment(device), settings={**settings, "amp": amp}, targets=TARGETS)
    report.write()
    torch.manual_seed(0)
    runners = {"exactness": exactness, "vectorized_32px": vectorized_32px, "throughput": throughput,
               "compile": compile_check}
    for section in SECTIONS:  # fixed order: the cheap and decisive parts first
        if section in args.sections:
            runners[section](report, args, device)
        else:
            report.skip(section, "not in --sections")
    report.data["checks"] = checks(report.data, device)
    report.data["complete"] = True
    report.write()
    print(summary(report.data))
    print(f"\nwrote {args.out} in {report.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
