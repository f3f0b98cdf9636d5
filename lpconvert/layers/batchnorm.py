"""Late-phase BatchNorm: K × (γ, β) and K × (running_mean, running_var, num_batches_tracked).

Covers every ``torch.nn.modules.batchnorm._BatchNorm`` (1d/2d/3d, SyncBatchNorm) and its subclasses such as timm's
``BatchNormAct2d`` (whose ``act``/``drop`` stay shared). Batch statistics are estimated per member, as in the paper.
"""

from __future__ import annotations

import torch

from ..errors import LatePhaseError
from .base import StackedLayer

BN_STATS_MODES = ("fold", "mean", "recalibrate")


class LatePhaseBatchNorm(StackedLayer):
    kind = "batchnorm"

    def fold_tensors(self) -> dict[str, torch.Tensor]:
        """The BN that outputs, in eval mode, the mean of the members' eval outputs.

        Member k computes a_k x + c_k with a_k = γ_k/√(v_k+ε), c_k = β_k − a_k μ_k, so the average is
        γ' x + β' with γ' = mean_k a_k, β' = mean_k c_k, stored with statistics (0, 1 − ε).
        """
        if "weight" not in self.param_names or "running_mean" not in self.buffer_names:
            raise LatePhaseError(
                f"bn_stats='fold' needs an affine BatchNorm with running statistics "
                f"({type(self.template).__name__} has affine={'weight' in self.param_names}, "
                f"track_running_stats={'running_mean' in self.buffer_names}); use bn_stats='mean'"
            )
        eps = self.template.eps
        weight, running_mean, running_var = self.weight.float(), self.running_mean.float(), self.running_var.float()
        bias = self.bias.float() if "bias" in self.param_names else torch.zeros_like(weight)
        scale = weight / torch.sqrt(running_var + eps)
        tensors = self.mean_tensors()
        tensors["weight"] = scale.mean(0).to(self.weight.dtype)
        if "bias" in self.param_names:
            tensors["bias"] = (bias - scale * running_mean).mean(0).to(self.bias.dtype)
        elif torch.any(running_mean != 0):
            raise LatePhaseError("bn_stats='fold' needs a BatchNorm with a bias when the running means are non-zero; use 'mean'")
        tensors["running_mean"] = torch.zeros_like(tensors["running_mean"])
        tensors["running_var"] = torch.full_like(tensors["running_var"], 1.0 - eps)
        return tensors

    def collapse(self, bn_stats: str = "fold", **options) -> torch.nn.Module:
        """Eq. 1 with the BN statistics chosen by `bn_stats`: 'fold', 'mean', or 'recalibrate' (mean; the caller
        re-estimates the statistics afterwards)."""
        if bn_stats == "fold":
            return self.to_original(self.fold_tensors())
        return self.to_original(self.mean_tensors())
