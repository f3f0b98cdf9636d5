"""How far the K members of late-phase runs moved apart, and how far the averaged model moved from its start.

    python scripts/member_spread.py RUN_DIR [RUN_DIR ...] [--checkpoint last]

Per run, over all late-phase parameters φ (stacked K × …) with φ0 their starting values, and all shared parameters θ:

* member spread  = sqrt(mean_k ‖φ_k − φ̄‖²) / ‖φ0‖, with φ̄ = mean_k φ_k (Eq. 1's average): how different the members are;
* averaged move  = ‖φ̄ − φ0‖ / ‖φ0‖: how far the collapsed late-phase weights went;
* shared move    = ‖θ − θ0‖ / ‖θ0‖.

If the spread is tiny, averaging and the non-averaged ensemble must agree: the members never became an ensemble.
The start is rebuilt from the run's own settings (model and ``--weights``), so it downloads nothing the run did not.
"""

from __future__ import annotations

import argparse
import math

import torch

from lpconvert import load_late_phase, load_model
from lpconvert.convert.members import late_phase_layers


def spread(run: str, which: str) -> dict[str, float]:
    model, checkpoint = load_late_phase(run, which)
    config = checkpoint.config
    if not config.get("weights") and not config.get("pretrained", True):
        raise SystemExit(f"{run} started from a random initialisation; its start cannot be rebuilt")
    start, _ = load_model(config["model"], weights=config.get("weights"), num_classes=config.get("num_classes"),
                          pretrained=config.get("pretrained", True))
    initial = start.state_dict()
    late_names = {f"{layer}.{name}" for layer, module in late_phase_layers(model).items()
                  for name, _ in module.named_parameters(recurse=False)}
    sums = dict(spread=0.0, moved=0.0, phi0=0.0, theta=0.0, theta0=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p, p0 = p.double(), initial[name].double()
            if name in late_names:
                mean = p.mean(0)
                sums["spread"] += (p - mean).pow(2).sum().item() / p.shape[0]
                sums["moved"] += (mean - p0).pow(2).sum().item()
                sums["phi0"] += p0.pow(2).sum().item()
            else:
                sums["theta"] += (p - p0).pow(2).sum().item()
                sums["theta0"] += p0.pow(2).sum().item()
    return {
        "member spread": math.sqrt(sums["spread"] / sums["phi0"]),
        "averaged move": math.sqrt(sums["moved"] / sums["phi0"]),
        "shared move": math.sqrt(sums["theta"] / sums["theta0"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of late-phase runs (lpconvert finetune outputs)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="last")
    args = parser.parse_args()
    print("| run | member spread | averaged move | shared move |\n|---|---:|---:|---:|")
    for run in args.runs:
        values = spread(run, args.checkpoint)
        print(f"| {run} | " + " | ".join(f"{v:.2e}" for v in values.values()) + " |")


if __name__ == "__main__":
    main()
