"""Late-phase BatchNorm: K × (γ, β) and K × (running_mean, running_var, num_batches_tracked).

Covers every ``torch.nn.modules.batchnorm._BatchNorm`` (1d/2d/3d, SyncBatchNorm) and its subclasses such as timm's
``BatchNormAct2d`` (whose ``act``/``drop`` stay shared). Batch statistics are estimated per member, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from lpconvert.errors import LatePhaseError
from lpconvert.layers.base import StackedLayer, member_mean
from lpconvert.layers.registry import register_kind

BN_STATS_MODES = ("fold", "mean", "recalibrate")


@register_kind
class LatePhaseBatchNorm(StackedLayer):
    kind = "batchnorm"
    aliases = ("bn", "norm")
    precedence = 60
    description = "BatchNorm scale/shift and running statistics (the paper's)"
    module_types = (nn.modules.batchnorm._BatchNorm,)

    def fold_tensors(self) -> dict[str, torch.Tensor]:
        """Eq. 1 for BatchNorm: in eval mode the collapsed layer outputs exactly the mean of its members' outputs, and
        it carries real statistics of its input, so it trains on like the original layer.

        Member k computes a_k (x − μ_k) + β_k with a_k = γ_k/√(v_k+ε). The collapsed layer keeps the members' mean
        statistics μ' = mean_k μ_k, v' = mean_k v_k (as ``mean`` does) and solves for its affine parameters:

            γ' = mean_k γ_k √(v'+ε)/√(v_k+ε),    β' = mean_k (β_k + a_k (μ' − μ_k)),

        so γ'(x − μ')/√(v'+ε) + β' = mean_k (a_k (x − μ_k) + β_k). Computed in float64 from φ_1 + mean_k(φ_k − φ_1):
        identical members give back the original tensors bit for bit. Without running statistics the layer always
        normalises with batch statistics, and the mean of γ, β is already the mean of the members' outputs.
        """
        tensors = self.mean_tensors()
        if "running_mean" not in self.buffer_names or "weight" not in self.param_names:
            return tensors
        eps = self.template.eps
        mean, var = self.running_mean.double(), self.running_var.double()
        mean_c, var_c = tensors["running_mean"].double(), tensors["running_var"].double()
        weight, root, root_c = self.weight.double(), torch.sqrt(var + eps), torch.sqrt(var_c + eps)
        tensors["weight"] = member_mean(weight * (root_c / root)).to(self.weight.dtype)
        shift = weight / root * (mean_c - mean)  # a_k (μ' − μ_k): zero for identical members
        if "bias" in self.param_names:
            tensors["bias"] = member_mean(self.bias.double() + shift).to(self.bias.dtype)
        elif torch.any(shift != 0):
            raise LatePhaseError(
                f"bn_stats='fold' needs a bias in {type(self.template).__name__} when the members' running means "
                "differ; use bn_stats='mean'"
            )
        return tensors

    def collapse(self, bn_stats: str = "fold", **options) -> torch.nn.Module:
        """Eq. 1 with the BN statistics chosen by `bn_stats`: 'fold', 'mean', or 'recalibrate' (mean; the caller
        re-estimates the statistics afterwards)."""
        if bn_stats == "fold":
            return self.to_original(self.fold_tensors())
        return self.to_original(self.mean_tensors())
