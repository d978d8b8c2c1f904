"""GPTQ's error-compensating weight rounding (Frantar et al., 2022), over the grids kiln's quantize
pass already chose. Per linear with weight W [N, K] and calibration inputs X:

    H = 2 X^T X + damp * mean(diag) * I,   U = upper Cholesky factor of H^-1
    for each column j, left to right:  q_j = round_to_grid(W_j);  e_j = (W_j - dq(q_j)) / U_jj
                                       W_{j+1:} -= e_j U_{j, j+1:}

so each column's rounding error is pushed into the columns not quantized yet, in the directions that
the inputs make cheapest (the lazy form: updates inside a block of 128 columns, then one matrix
product for the rest). The grid is fixed before the sweep (static groups: scale and zero point come
from the weight as the quantize pass saw it, AWQ-scaled and clipped where AWQ ran), so the stored
format is unchanged: GPTQ only decides which grid point each weight rounds to. The sweep itself
starts from the unclipped weight (`sweep_source`): AWQ's clipping chose the grid for rounding to
nearest, and GPTQ compensates the clipping error as it does the rounding error. Grids: int4 groups
with zero points (AutoAWQ's), int8 per output channel, e4m3 per tensor or per output channel
(round to nearest even, saturate at +-448). An input channel never seen non-zero in calibration gets
H_jj = 1 (GPTQ's rule); its weights round to nearest and push no error.

The calibrate pass keeps the mean of x x^T per linear input when asked (`calibrate{hessian=true}`);
`quantize{rounding=gptq}` (QuantConfig.weight_rounding="gptq") rounds with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir.ops.quant import _FP8_MAX, _INT_RANGE
from ..ir.storage import Storage
from ..ir.types import DType, TensorType

WEIGHT_ROUNDINGS = ("nearest", "gptq")
"""How the quantize pass rounds a weight onto its grid: to the nearest point, or GPTQ's sweep."""


@dataclass(frozen=True)
class Grid:
    """Where one weight's values may land: q in `dtype`'s range, dequantized (q - zero) * scale;
    scale and zero broadcast against the weight [N, K]."""

    scale: torch.Tensor            # f64, broadcastable to [N, K]
    zero: torch.Tensor | None      # f64, broadcastable to [N, K]; None: symmetric
    dtype: DType

    def round(self, w: torch.Tensor, cols: slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, dequantized q) of the weight columns `cols` (w holds just those columns), as quant.quantize
        rounds: half to even, saturated."""
        s = _columns(self.scale, cols)
        y = w / s
        if self.dtype in _FP8_MAX:
            m = _FP8_MAX[self.dtype]
            q = y.clamp(-m, m).float().to(self.dtype.torch)
            return q, q.double() * s
        lo, hi = _INT_RANGE[self.dtype]
        z = 0.0 if self.zero is None else _columns(self.zero, cols)
        q = (torch.round(y) + z).clamp(lo, hi)
        return q, (q - z) * s


def _columns(p: torch.Tensor, cols: slice | int) -> torch.Tensor:
    """Columns of a parameter broadcast against [N, K] (a [N, 1] or [] one is the same for every column)."""
    if p.dim() < 2 or p.shape[1] == 1:
        return p if p.dim() < 2 or isinstance(cols, slice) else p[:, 0]
    return p[:, cols]


def expand_grid(scale: torch.Tensor, zero: torch.Tensor | None, axis: int | None, group_size: int | None,
                dtype: DType) -> Grid:
    """A weight's grid from its stored scale (and zero point), laid out as quant.dequantize reads them:
    per tensor (axis None), per output channel (axis 0) or per group of `group_size` inputs (axis 1)."""
    if axis is not None and axis % 2 != (0 if group_size is None else 1):
        raise ValueError(f"GPTQ rounds weights quantized per tensor, per output channel (axis 0) or in groups along "
                         f"the inputs (axis 1); got axis={axis}, group_size={group_size}")

    def spread(p: torch.Tensor) -> torch.Tensor:
        p = p.double()
        if axis is None:
            return p.reshape(())
        return p.reshape(-1, 1) if group_size is None else p.repeat_interleave(group_size, dim=1)
    return Grid(spread(scale), None if zero is None else spread(zero), dtype)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, f64, H_jj of dead inputs set to 1."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    diag = torch.diagonal(h)
    diag += damp * diag.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, block: int = 128,
               damp: float = 0.01) -> torch.Tensor:
    """GPTQ's quantized values of `weight` [N, K] on `grid`, for inputs whose x^T x is `hessian` [K, K]
    (any positive multiple: the dampening is relative): int8 holding i4/i8 values, or e4m3."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"GPTQ needs a weight [N, K] and a Hessian [K, K], got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}")
    w = weight.double().clone()
    u = inverse_hessian_factor(hessian, damp)
    held = grid.dtype.torch if grid.dtype in _FP8_MAX else torch.int8
    q = torch.empty(w.shape, dtype=held)
    k = w.shape[1]
    for start in range(0, k, block):
        end = min(start + block, k)
        wb, ub = w[:, start:end].clone(), u[start:end, start:end]
        err = torch.empty_like(wb)
        for i in range(end - start):
            qi, dq = grid.round(wb[:, i], start + i)
            q[:, start + i] = qi.to(held)
            err[:, i] = (wb[:, i] - dq) / ub[i, i]
            wb[:, i + 1:] -= err[:, i:i + 1] * ub[i, i + 1:]
        w[:, end:] -= err @ u[start:end, end:]
    return q


def sweep_source(storage: Storage) -> Storage:
    """The weight GPTQ sweeps: AWQ's clipping only picks the grid (the quantize pass takes scale and zero
    from the clipped weight), so the sweep starts from the unclipped weight, whose values beyond the
    grid then saturate and push their error into later columns like any other rounding error."""
    from .channel_scaling import ClippedStorage

    return storage.source if isinstance(storage, ClippedStorage) else storage


@dataclass(eq=False)
class GptqStorage(Storage):
    """The quantized values of `source` on the grid its `scale` (and `zero`) storages define, rounded by
    GPTQ with `hessian`; what quant.quantize would give with rounding to nearest, in the same layout
    (i4 held unpacked, one per int8). Computed once: the quantize pass loads it with progress shown."""

    source: Storage
    scale: Storage
    zero: Storage | None
    hessian: torch.Tensor
    dtype: DType                  # the grid's (i4, i8, f8e4m3); `type` is how the values are held (i4 as i8)
    axis: int | None
    group_size: int | None
    type: TensorType
    block: int = 128
    damp: float = 0.01
    _values: torch.Tensor | None = field(default=None, init=False, repr=False)

    def load(self) -> torch.Tensor:
        if self._values is None:
            grid = expand_grid(self.scale.load(), None if self.zero is None else self.zero.load(), self.axis,
                               self.group_size, self.dtype)
            self._values = gptq_round(self.source.load(), self.hessian, grid, block=self.block, damp=self.damp)
        return self._values

    def describe(self) -> str:
        return f"GPTQ rounding (block {self.block}, damp {self.damp:g}) of ({self.source.describe()})"

