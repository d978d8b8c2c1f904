"""LLM.int8()'s mixed-precision decomposition: the input features of a linear whose calibrated
|x| max exceeds a threshold (6.0 in the paper) are outliers, kept in 16-bit; the rest go through
vector-wise int8 (per-token activations x per-output-channel weights).

    %y = llm.linear(%x, @w)
becomes
    %xi = core.gather(%x, @w.inlier_columns) {dim=-1}
    %yi = llm.linear(%xi, @w.inliers)            <- quantized W8A8 by the quantize pass
    %xo = core.gather(%x, @w.outlier_columns) {dim=-1}
    %yo = llm.linear(%xo, @w.outliers)           <- stays float
    %y = core.add(%yi, %yo)

The outlier columns are chosen once, from calibration, rather than per batch as bitsandbytes does:
the graph keeps static shapes, and the float weight columns are kept only for those features.
"""

from __future__ import annotations

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Op
from ..ir.storage import DerivedStorage, TensorStorage
from ..ir.types import TensorType
from .calibrate import InputStats
from .manager import remark
from .quantize import fresh_param


def outlier_columns(stats: InputStats, threshold: float) -> torch.Tensor:
    """The input features whose calibrated |x| max exceeds `threshold`, ascending."""
    return (stats.channel_amax > threshold).nonzero().flatten()


def split_outliers(graph: Graph, op: Op, stats: InputStats, threshold: float) -> Op | None:
    """Split a linear into its inlier part (returned: the linear to quantize) and a float linear
    over the outlier features; a linear without outliers is returned as it is, one with nothing but
    outliers stays float (None)."""
    x, w, bias = op.operands[0], op.operands[1], op.operands[2:]
    n, k = w.type.shape
    outliers = outlier_columns(stats, threshold)
    if len(outliers) == 0:
        return op
    if len(outliers) == k:
        remark(f"{op.loc or w.name} stays float: every input feature exceeds the LLM.int8() threshold {threshold:g}")
        return None
    keep = torch.ones(k, dtype=torch.bool)
    keep[outliers] = False
    inliers = keep.nonzero().flatten()
    remark(f"{op.loc or w.name}: {len(outliers)} of {k} input features stay float (|x| max > {threshold:g})")
    b = Builder(graph, before=op, loc=op.loc)

    def part(columns: torch.Tensor, what: str) -> tuple:
        idx = graph.add_param(fresh_param(graph, f"{w.name}.{what[:-1]}_columns"), storage=TensorStorage(columns))
        t = TensorType(w.type.dtype, (n, len(columns)))
        weight = graph.add_param(fresh_param(graph, f"{w.name}.{what}"), t,
                                 DerivedStorage("core.gather", [w.storage, idx.storage], {"dim": 1}, t))
        return b.core.gather(x, idx, dim=-1), weight

    xi, wi = part(inliers, "inliers")
    xo, wo = part(outliers, "outliers")
    inlier = b.create("llm.linear", xi, wi, *bias)
    y = b.core.add(inlier.results[0], b.llm.linear(xo, wo))
    graph.replace_all_uses(op.results[0], y)
    graph.erase_op(op)
    if graph.num_uses(w) == 0 and w not in graph.outputs:
        graph.remove_param(w.name)
    return inlier
