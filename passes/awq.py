"""`awq`: AWQ's activation-aware weight transformation before int4 quantization (Lin et al., 2023;
the search of AutoAWQ). Per linear group (the linears reading one input):

1. scale search: s = mean|x|^r / mean_norm|W|^(1-r), normalised by sqrt(max(s) min(s)), for r on a
   grid in [0, 1); the r whose int4-quantized W*s, applied to x/s, reproduces the float output
   x @ W.T best on calibration rows wins; x/s is folded into what computes x (channel_scaling.py)
   and W*s replaces the weights;
2. clipping: per output channel and group of G inputs, the range that minimises the group's
   partial-output error on those rows (AutoAWQ's auto_clip: ends shrunk by (1 - i/20), i < 10). With
   zero points the group's min and max are shrunk apart, by coordinate descent, where AutoAWQ clips
   to a symmetric [-b, b] that cannot tighten one side of a skewed group without the other (on
   SmolLM2 at g64 this takes perplexity from +13.9% to +10.3% of bf16, 12 held-out windows); the
   rows that make attention queries and keys, which feed rope, are not clipped, as AutoAWQ skips q/k.

The quantize pass then rounds the transformed weights to int4 groups (algo=w4a16 or w4a16-awq).
Everything is lazy: the new parameters are scaled and clipped views of the originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.graph import Graph, Op
from .calibrate import Calibration, attach_calibration, calibration_for
from .channel_scaling import (
    ClippedStorage,
    LinearGroup,
    apply_scale,
    linear_groups,
    replace_operand,
    tied_mean,
)
from .manager import register_pass, remark
from .pattern import P, Var
from .quantize import int4_group_params


def fake_quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """w rounded to int4 groups and back, in f32, exactly as the quantize pass rounds it (f32 scales)."""
    scale, zero = int4_group_params(w, group_size, zero_point, torch.float32)
    g = w.float().reshape(*w.shape[:-1], -1, group_size)
    s = scale[..., None]
    if zero is None:
        q = torch.round(g / s).clamp(-8, 7)
    else:
        z = zero.float()[..., None]
        q = (torch.round(g / s) + z).clamp(-8, 7) - z
    return (q * s).reshape(w.shape)


@dataclass(frozen=True)
class AwqSettings:
    group_size: int = 128
    zero_point: bool = True
    grid: int = 20              # scale exponents r = i / grid
    clip_grid: int = 20         # clip bounds shrink in steps of 1 / clip_grid ...
    clip_max_shrink: float = 0.5  # ... down to (1 - clip_max_shrink) of the group's max
    clip_rows: int = 512        # calibration rows used for clipping
    clip_rounds: int = 2        # zero-point groups: passes of the min-then-max search of the clipping range
    clip: bool = True


_BATCH = 1 << 25   # elements of the candidate tensors evaluated at once


def search_scale(group: LinearGroup, x: torch.Tensor, x_mean: torch.Tensor, settings: AwqSettings
                 ) -> tuple[torch.Tensor, float, float]:
    """AWQ's grid search: (s per fold channel, best loss, loss without scaling)."""
    w = group.weight()
    gs = settings.group_size
    norm = w.abs().reshape(w.shape[0], -1, gs)
    w_mean = (norm / (norm.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    fold = group.fold
    x_fold, w_fold = tied_mean(x_mean, fold), tied_mean(w_mean, fold)
    r = (torch.arange(settings.grid, dtype=torch.float32) / settings.grid)[:, None]
    s = (x_fold[None].pow(r) / (w_fold[None].pow(1 - r) + 1e-4)).clamp(min=1e-4)     # [grid, fold channels]
    s = s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()
    s_x = s[:, fold.tie][:, None, :]                                                   # [grid, 1, K]
    ref = x @ w.t()
    losses = []
    step = max(1, _BATCH // w.numel())
    for i in range(0, settings.grid, step):
        wq = fake_quantize_int4(w[None] * s_x[i:i + step], gs, settings.zero_point) / s_x[i:i + step]
        losses.append((x @ wq.transpose(1, 2) - ref).pow(2).mean((1, 2)))
    losses = torch.cat(losses)
    plain = (x @ fake_quantize_int4(w, gs, settings.zero_point).t() - ref).pow(2).mean().item()
    best = int(losses.argmin())
    return s[best], float(losses[best]), plain


def search_clip(w: torch.Tensor, x: torch.Tensor, settings: AwqSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's auto_clip, per (output channel, group of G inputs): the clipping range [lower, upper]
    of w whose int4 rounding has the least partial-output error mean_t (x_t . (q - w))^2 on rows x,
    each end shrunk towards 0 in steps of 1/clip_grid up to clip_max_shrink. Groups with zero points
    search the two ends apart (their scale and zero follow both; `clip_rounds` passes of coordinate
    descent, min then max), symmetric groups one bound on |w| as AutoAWQ does. Returns (lower, upper),
    each [N, K / G]."""
    gs = settings.group_size
    n, k = w.shape
    groups = k // gs
    xg = x.float().reshape(x.shape[0], groups, gs)
    gram = torch.einsum("tgi,tgj->gij", xg, xg) / x.shape[0]          # the error is e . gram_g . e per group
    shrink = 1 - torch.arange(1, int(settings.clip_max_shrink * settings.clip_grid)) / settings.clip_grid
    lowers, uppers = [], []
    rows = max(1, _BATCH // (8 * k))
    for first in range(0, n, rows):
        wg = w[first:first + rows].float().reshape(-1, groups, gs)
        if settings.zero_point:
            lower0, upper0 = wg.amin(-1), wg.amax(-1)
            ends = [(lower0, False), (upper0, True)] * settings.clip_rounds
        else:
            upper0 = wg.abs().amax(-1)
            lower0 = -upper0
            ends = [(upper0, None)]
        lower, upper = lower0, upper0
        best = _clip_error(wg, lower, upper, gram, settings)
        for start, is_upper in ends:
            for f in shrink:
                if is_upper is None:
                    cand = (-start * f, start * f)
                else:
                    cand = (lower, start * f) if is_upper else (start * f, upper)
                err = _clip_error(wg, *cand, gram, settings)
                better = err < best
                best = torch.where(better, err, best)
                lower, upper = torch.where(better, cand[0], lower), torch.where(better, cand[1], upper)
        lowers.append(lower)
        uppers.append(upper)
    return torch.cat(lowers), torch.cat(uppers)


def _clip_error(wg: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, gram: torch.Tensor,
                settings: AwqSettings) -> torch.Tensor:
    """Per group of wg [N, groups, G], the partial-output error e . gram_g . e of clipping it to
    [lower, upper] and rounding to int4 (= mean_t (x_t . e)^2 with gram_g = mean_t x_t x_t^T)."""
    clipped = torch.minimum(torch.maximum(wg, lower[..., None]), upper[..., None])
    e = fake_quantize_int4(clipped.flatten(1), settings.group_size, settings.zero_point).reshape(wg.shape) - wg
    return torch.einsum("ngi,gij,ngj->ng", e, gram, e)


_ROPE_ROWS = P("llm.rope", P("core.reshape", P("core.slice", Var("out"), name="rows")), Var(), Var(), variadic=True)


def rope_rows(graph: Graph, op: Op) -> list[tuple[int, int]]:
    """The output rows of a linear that feed rope (attention queries and keys)."""
    out = op.results[0]
    found = []
    for user in graph.users(out):
        for reader in graph.users(user.results[0]) if user.name == "core.slice" else []:
            for rope in graph.users(reader.results[0]):
                m = next(iter(_ROPE_ROWS.match_op(graph, rope, {})), None)
                if m is not None and m["out"] is out and m["rows"] is user.results[0]:
                    n = out.type.shape[-1]
                    found.append((user.attrs["start"], n if user.attrs["end"] is None else user.attrs["end"]))
    return found


def _clip(graph: Graph, op: Op, x: torch.Tensor, settings: AwqSettings, calibration: Calibration) -> int:
    w = op.operands[1]
    weight = w.storage.load().float()
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    for start, end in rope_rows(graph, op):
        keep[start:end] = False
    if not keep.any():
        return 0
    upper = torch.full((weight.shape[0], weight.shape[1] // settings.group_size), float("inf"))
    lower = -upper
    lower[keep], upper[keep] = search_clip(weight[keep], x, settings)
    replace_operand(graph, op, 1, ClippedStorage(w.storage, upper, settings.group_size, lower), "clip", calibration)
    return int(keep.sum())


def _sample(rows: torch.Tensor, n: int) -> torch.Tensor:
    if rows.shape[0] <= n:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, n).long()]


def awq_graph(graph: Graph, calibration: Calibration, settings: AwqSettings, exclude: tuple[str, ...] = (),
              progress: bool = True) -> tuple[int, Calibration]:
    """Search and fold AWQ scales, then clip, for every linear group with calibration rows; returns
    how many groups were scaled and the calibration of the transformed graph."""
    from tqdm.auto import tqdm

    count = 0
    groups = linear_groups(graph)
    for group in tqdm(groups, desc="awq", unit="group", disable=not progress, leave=False):
        name = group.linears[0].operands[1].name
        k = group.x.type.shape[-1]
        stats = calibration.get(name)
        skip = group.excluded_by(exclude)
        if skip is not None:
            remark(f"{group.where} is not searched: excluded by {skip!r}")
            continue
        if any(graph.num_uses(op.operands[1]) != 1 for op in group.linears):
            remark(f"{group.where} is not searched: its weight is shared with another op")
            continue
        if stats is None or stats.rows is None or stats.channel_mean_abs is None:
            remark(f"{group.where} is not searched: the calibration has no rows for @{name} (calibrate{{rows=512}})")
            continue
        if not isinstance(k, int) or k % settings.group_size:
            remark(f"{group.where} is not searched: in_features {k} is not a multiple of {settings.group_size}")
            continue
        if group.fold is not None:
            s, _, _ = search_scale(group, stats.rows, stats.channel_mean_abs, settings)
            calibration = apply_scale(graph, group, s, calibration, "awq")
            count += 1
        else:
            remark(f"{group.where} is only clipped, not scaled: {group.why_not}")
        if settings.clip:
            x = _sample(calibration[group.linears[0].operands[1].name].rows, settings.clip_rows)
            for op in group.linears:
                _clip(graph, op, x, settings, calibration)
    return count, calibration


@register_pass("awq")
def awq(graph: Graph, *, group_size: int = 128, zero_point: bool = True, grid: int = 20, clip: bool = True,
        exclude: str = "lm_head|*.lm_head", calib: str = "") -> int:
    """AWQ: activation-aware per-channel scales (searched on calibration rows, folded into the
    preceding norm or linear) and weight clipping, ahead of quantize{algo=w4a16}."""
    calibration = dict(calibration_for(graph, calib, "awq"))
    count, calibration = awq_graph(graph, calibration, AwqSettings(group_size, zero_point, grid, clip=clip),
                                   tuple(p for p in exclude.split("|") if p))
    attach_calibration(graph, calibration)
    return count
