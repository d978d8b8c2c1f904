"""`smooth`: SmoothQuant's migration of activation outliers into the weights. Per input channel j
of a linear group, s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha); x / s is folded into what
computes x (the preceding norm, the v rows for o_proj, the up rows for down_proj: see
channel_scaling.py) and W * s replaces the weights, so the float graph computes the same function
while x's channels become even enough to quantize per token. The calibration attached to the
graph is updated to the smoothed activations (the quantize pass reads it after).
"""

from __future__ import annotations

import torch

from ..ir.graph import Graph
from .calibrate import Calibration, attach_calibration, calibration_for
from .channel_scaling import LinearGroup, apply_scale, linear_groups, tied_max
from .manager import register_pass, remark

_S_RANGE = (1e-5, 1e5)


def smoothing_scale(group: LinearGroup, calibration: Calibration, alpha: float) -> torch.Tensor:
    """s per fold channel: max|x|^alpha / max|W|^(1-alpha), the maxima taken over tied channels."""
    x_amax = calibration[group.linears[0].operands[1].name].channel_amax
    w_amax = group.weight().abs().amax(0)
    s = tied_max(x_amax, group.fold).pow(alpha) / tied_max(w_amax, group.fold).clamp(min=1e-8).pow(1 - alpha)
    return s.clamp(*_S_RANGE)


def smooth_graph(graph: Graph, calibration: Calibration, alpha: float = 0.5, exclude: tuple[str, ...] = ()
                 ) -> tuple[int, Calibration]:
    """Smooth every linear group whose input can take a per-channel scale; returns how many, and the
    calibration of the smoothed graph."""
    count = 0
    for group in linear_groups(graph):
        name = group.linears[0].operands[1].name
        skip = group.excluded_by(exclude)
        if skip is not None:
            remark(f"{group.where} is not smoothed: excluded by {skip!r}")
        elif group.fold is None:
            remark(f"{group.where} is not smoothed: {group.why_not}")
        elif name not in calibration:
            remark(f"{group.where} is not smoothed: the calibration has no statistics for @{name}")
        else:
            calibration = apply_scale(graph, group, smoothing_scale(group, calibration, alpha), calibration, "smooth")
            count += 1
    return count, calibration


@register_pass("smooth")
def smooth(graph: Graph, *, alpha: float = 0.5, exclude: str = "lm_head|*.lm_head", calib: str = "") -> int:
    """SmoothQuant: migrate activation outliers into the weights (x / s into the preceding norm or
    linear, W * s), alpha the migration strength; needs calibration (calibrate pass or calib=FILE)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    count, calibration = smooth_graph(graph, calibration_for(graph, calib, "smooth"), alpha,
                                      tuple(p for p in exclude.split("|") if p))
    attach_calibration(graph, calibration)
    return count
