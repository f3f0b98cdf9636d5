"""Late-phase vs plain fine-tuning throughput, measured in ONE run on the same model, batch and device.

    python scripts/bench_finetune.py --model resnet50 --size 224 --batch 256          # GPU: bf16 + channels_last
    python scripts/bench_finetune.py --model resnet18 --size 64 --batch 32 --steps 20  # a CPU-sized figure
    python scripts/bench_finetune.py --vectorized-model cifar_resnet20 --size 32       # vectorized vs sequential
    python scripts/bench_finetune.py ... --data ../shared/data/cifar10                 # + the real data loader

Figures: images/s of (a) plain fine-tuning (one SGD step per minibatch), (b) late-phase sequential (K members,
θ steps every K minibatches), (c) at small inputs late-phase vectorized vs sequential; the ratios between them and
the peak GPU memory of each. Synthetic batches already on the device isolate the training step; ``--data`` adds the
figure with the real loader. ``--markdown FILE`` appends the table (with the hardware) to FILE.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from functools import partial

import timm
import torch
import torch.nn.functional as F

import lpconvert


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _batches(args, device, size, count):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, 3, size, size, generator=g) for _ in range(count)]
    ys = [torch.randint(0, 1000, (args.batch,), generator=g) for _ in range(count)]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return [x.to(device, memory_format=fmt) for x in xs], [y.to(device) for y in ys]


def plain_step(model, args, device, stacked: bool = False):
    """Ordinary fine-tuning: one optimizer step per minibatch (``stacked``: one step on the K minibatches at once,
    the batch size a vectorized late-phase forward sees)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step(xs, ys):
        if stacked:
            xs, ys = [torch.cat(xs)], [torch.cat(ys)]
        for x, y in zip(xs, ys):
            with torch.autocast(device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def late_phase_step(model, args, device, mode: str):
    """Algorithm 1: K minibatches, K member steps, one θ step."""
    engine = lpconvert.LatePhaseEngine(
        model, partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4), mode=mode,
        autocast_dtype=args.amp_dtype,
    )
    return engine.step


def _timed(step, iterations, device, warmup: int) -> float:
    """Images/s of `step` over (xs, ys) iterations of K minibatches each, after `warmup` untimed iterations."""
    images, seconds = _images_and_seconds(step, iterations, device, warmup)
    return images / seconds


def _images_and_seconds(step, iterations, device, warmup: int) -> tuple[int, float]:
    images, start = 0, None
    for i, (xs, ys) in enumerate(iterations):
        if i == warmup:
            _sync(device)
            start, images = time.perf_counter(), 0
        step(xs, ys)
        images += sum(x.shape[0] for x in xs)
    _sync(device)
    return images, time.perf_counter() - start


def _repeat(xs, ys, count):
    return ((xs, ys) for _ in range(count))


def measure(name: str, size: int, args, device, modes=("plain", "sequential")) -> dict[str, tuple[float, float]]:
    base = timm.create_model(name, num_classes=1000).to(device)
    if args.channels_last:
        base = base.to(memory_format=torch.channels_last)
    xs, ys = _batches(args, device, size, args.K)
    steps, peaks = {}, {}
    for mode in modes:  # one at a time: warm-up and the peak memory of each mode alone
        model = copy.deepcopy(base).train()
        _peak_reset(device)
        if mode.startswith("plain"):
            steps[mode] = plain_step(model, args, device, stacked=mode == "plain-stacked")
        else:
            steps[mode] = late_phase_step(lpconvert.convert(model, K=args.K, targets="batchnorm"), args, device, mode)
        _timed(steps[mode], _repeat(xs, ys, args.warmup + 1), device, args.warmup)
        peaks[mode] = _peak(device)
    # then the timed rounds in alternating order (A B B A …): drift of a shared machine hits every mode alike
    totals = {mode: [0, 0.0] for mode in modes}
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else tuple(reversed(modes))):
            images, seconds = _images_and_seconds(steps[mode], _repeat(xs, ys, args.steps), device, 0)
            totals[mode][0] += images
            totals[mode][1] += seconds
    out = {mode: (images / seconds, peaks[mode]) for mode, (images, seconds) in totals.items()}
    return out


def measure_loader(name: str, args, device) -> dict[str, float]:
    """The same comparison fed by lpconvert's real data pipeline (decode, augmentation, transfer)."""
    from lpconvert.config import FinetuneConfig
    from lpconvert.data import build_data, train_loader
    from lpconvert.train.engine import iterate_members

    base = timm.create_model(name, num_classes=10).to(device)
    config = FinetuneConfig(model=name, data=args.data, batch_size=args.batch, workers=args.workers,
                            train_subset=args.batch * args.K * (args.steps + args.warmup))
    loader = train_loader(build_data(config.data_settings, base).train, config.batch_size, seed=config.seed, workers=config.workers)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def stream():
        for xs, ys in iterate_members(loader, args.K):
            yield ([x.to(device, non_blocking=True, memory_format=fmt) for x in xs],
                   [y.to(device, non_blocking=True) for y in ys])

    plain = _timed(plain_step(copy.deepcopy(base).train(), args, device), stream(), device, args.warmup)
    lp = lpconvert.convert(copy.deepcopy(base).train(), K=args.K, targets="batchnorm")
    late = _timed(late_phase_step(lp, args, device, "sequential"), stream(), device, args.warmup)
    return {"plain": plain, "sequential": late}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="Timed rounds per mode, in alternating order.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "off"], default=None, help="[default: bf16 on GPU, off on CPU]")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--vectorized-model", default=None, help="Also compare vectorized vs sequential on this model.")
    parser.add_argument("--vectorized-size", type=int, default=32)
    parser.add_argument("--vectorized-batch", type=int, default=128)
    parser.add_argument("--data", default=None, help="Data root for the real-loader figure.")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--markdown", default=None, help="Append the result table to this file.")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    args.amp_dtype = torch.bfloat16 if amp == "bf16" else None
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")

    lines = [f"### {args.model} @ {args.size}px, batch {args.batch}, K={args.K}, amp={amp}, "
             f"channels_last={args.channels_last} — {hardware}, torch {torch.__version__}", "",
             "| run | images/s | × plain | peak GPU memory (GiB) |", "|---|---:|---:|---:|"]
    result = measure(args.model, args.size, args, device)
    plain = result["plain"][0]
    for mode, (rate, peak) in result.items():
        lines.append(f"| {mode if mode == 'plain' else 'late-phase ' + mode} | {rate:.1f} | {rate / plain:.3f} | "
                     f"{peak:.2f} |")
    if device.type == "cuda":
        lines.append(f"\npeak memory late-phase sequential / plain: "
                     f"{result['sequential'][1] / result['plain'][1]:.3f}")
    if args.vectorized_model:
        saved = args.batch
        args.batch = args.vectorized_batch
        vec = measure(args.vectorized_model, args.vectorized_size, args, device,
                      modes=("sequential", "vectorized", "plain-stacked"))
        args.batch = saved
        ratio = vec["vectorized"][0] / vec["sequential"][0]
        lines += ["", f"{args.vectorized_model} @ {args.vectorized_size}px, batch {args.vectorized_batch}, "
                      f"K={args.K}: sequential {vec['sequential'][0]:.1f} img/s, vectorized "
                      f"{vec['vectorized'][0]:.1f} img/s — vectorized / sequential = {ratio:.2f}×; plain fine-tuning "
                      f"on the same {args.K}×{args.vectorized_batch} stacked batch: {vec['plain-stacked'][0]:.1f} img/s "
                      f"(vectorized / plain-stacked = {vec['vectorized'][0] / vec['plain-stacked'][0]:.2f}×), "
                      f"peak memory {vec['sequential'][1]:.2f} / {vec['vectorized'][1]:.2f} GiB"]
    if args.data:
        real = measure_loader(args.model, args, device)
        lines += ["", f"with the real data loader ({args.data}, {args.workers} workers): plain {real['plain']:.1f} "
                      f"img/s, late-phase {real['sequential']:.1f} img/s (ratio {real['sequential'] / real['plain']:.3f})"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
