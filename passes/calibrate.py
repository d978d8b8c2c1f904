"""Calibration: run a stateless graph on the reference interpreter over sample text with observers
on the values quantization needs to know, and keep what they saw:

- the input of every `llm.linear` with a parameter weight: |x| max per input channel (FP8's static
  activation scales, SmoothQuant's migration, LLM.int8()'s outlier features), mean |x| per channel
  (AWQ's activation statistic), and optionally a sample of whole rows (AWQ's search evaluates the
  quantized linear's output error on them) and the mean of x x^T (`hessian=True`: GPTQ's Hessian,
  H = 2 X^T X up to a factor, passes/gptq.py);
- the k and v operands of every `llm.attention`, |x| max per (kv head, head_dim) channel (and the
  sampled rows when asked for): the scales of an FP8 KV cache. They are keyed `k_cache.<i>` /
  `v_cache.<i>` after the i-th attention, the names the kv-cache pass gives the layer's caches.

The default text is Python's own `pydoc_data.topics`, tokenized once; calibration windows are
taken from its start and evaluation windows (`eval_windows`) from its end, so the two never
overlap. The `calibrate` pass attaches its result to the graph, where `smooth`, `awq` and
`quantize` later in the same pipeline find it.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import interpreter
from ..ir.graph import Graph, Value
from .manager import register_pass, remark


@dataclass(frozen=True)
class InputStats:
    """What calibration saw at one observed value, per channel (the last dim; for attention k/v,
    kv head x head_dim): |x| max, mean |x|, and when asked for a sample of rows and the mean of x x^T."""

    channel_amax: torch.Tensor                  # f32[K]
    channel_mean_abs: torch.Tensor | None = None  # f32[K]
    rows: torch.Tensor | None = None            # f32[S, K]
    gram: torch.Tensor | None = None            # f32[K, K]: mean over rows of x x^T (GPTQ's Hessian / 2)

    @property
    def amax(self) -> float:
        return float(self.channel_amax.max())

    def divided(self, s: torch.Tensor) -> InputStats:
        """The statistics of x / s, s one positive scale per channel (what smoothing does to x)."""
        s = s.float()
        return InputStats(self.channel_amax / s, None if self.channel_mean_abs is None else self.channel_mean_abs / s,
                          None if self.rows is None else self.rows / s,
                          None if self.gram is None else self.gram / (s[:, None] * s[None, :]))


Calibration = dict[str, InputStats]
"""Weight parameter name (or `k_cache.<i>` / `v_cache.<i>`) -> statistics of what it saw."""


# -- attaching a calibration to the graph it describes -----------------------------------------------

_ATTACHED: weakref.WeakKeyDictionary[Graph, Calibration] = weakref.WeakKeyDictionary()


def attach_calibration(graph: Graph, calibration: Calibration) -> None:
    """Make `calibration` the one later passes of a pipeline on `graph` use."""
    _ATTACHED[graph] = calibration


def attached_calibration(graph: Graph) -> Calibration | None:
    return _ATTACHED.get(graph)


def calibration_for(graph: Graph, calib: str, needed_by: str) -> Calibration:
    """The calibration a pass uses: the file `calib` names, else the one attached by `calibrate`."""
    if calib:
        return load_calibration(calib)
    found = attached_calibration(graph)
    if found is None:
        raise ValueError(f"{needed_by} needs calibration statistics: run the calibrate pass before it in the "
                         f"same pipeline (calibrate{{tokenizer=MODEL}}), or give calib=FILE (save_calibration)")
    return found


# -- text -------------------------------------------------------------------------------------------

def pydoc_tokens(tokenizer: Any) -> torch.Tensor:
    """All of `pydoc_data.topics`, in sorted topic order, as one i64 token stream."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def calib_windows(tokens: torch.Tensor, samples: int, length: int) -> list[torch.Tensor]:
    """`samples` consecutive windows of `length` tokens from the start of the stream."""
    _check_room(tokens, samples, length)
    return [tokens[i * length:(i + 1) * length] for i in range(samples)]


def eval_windows(tokens: torch.Tensor, samples: int, length: int) -> list[torch.Tensor]:
    """`samples` windows of `length` tokens from the end of the stream (disjoint from calib_windows
    as long as both fit)."""
    _check_room(tokens, samples, length)
    end = len(tokens)
    return [tokens[end - (i + 1) * length:end - i * length] for i in reversed(range(samples))]


def _check_room(tokens: torch.Tensor, samples: int, length: int) -> None:
    if samples < 1 or length < 2:
        raise ValueError(f"need at least one window of two tokens, got samples={samples}, length={length}")
    if samples * length > len(tokens) // 2:
        raise ValueError(f"{samples} windows of {length} tokens need {samples * length} tokens, but only half of "
                         f"the {len(tokens)} are for calibration (the other half is held out for evaluation): "
                         f"use fewer or shorter windows")


# -- observing --------------------------------------------------------------------------------------

def linear_inputs(graph: Graph) -> dict[str, Value]:
    """Weight parameter name -> the input of an `llm.linear` reading that weight."""
    out: dict[str, Value] = {}
    for op in graph.ops:
        if op.name == "llm.linear" and op.operands[1].is_param:
            out.setdefault(op.operands[1].name, op.operands[0])
    return out


def kv_inputs(graph: Graph) -> dict[str, Value]:
    """`k_cache.<i>` / `v_cache.<i>` -> the k / v operand of the i-th `llm.attention`."""
    out: dict[str, Value] = {}
    for i, op in enumerate(o for o in graph.ops if o.name == "llm.attention"):
        out[f"k_cache.{i}"], out[f"v_cache.{i}"] = op.operands[1], op.operands[2]
    return out


def kv_channels(x: torch.Tensor) -> torch.Tensor:
    """[batch, kv_heads, T, head_dim] -> [T', kv_heads * head_dim]: kv channels, head-major, as the
    k/v linear's output columns are."""
    return x.transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3])


@dataclass
class _Observer:
    """Running |x| max and sum, sampled rows, and the running sum of x x^T (when kept) of one value
    over the calibration windows."""

    amax: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    count: int = 0
    rows: list[torch.Tensor] | None = None
    gram_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, picks: torch.Tensor | None, gram: torch.Tensor | None = None) -> None:
        a = x.detach().abs().float().cpu()
        self.amax = a.amax(0) if self.amax is None else torch.maximum(self.amax, a.amax(0))
        self.abs_sum = a.sum(0, dtype=torch.float64) if self.abs_sum is None else self.abs_sum + a.sum(0)
        self.count += a.shape[0]
        if picks is not None:
            self.rows = (self.rows or []) + [x.detach().float().cpu()[picks]]
        if gram is not None:
            self.gram_sum = gram.clone() if self.gram_sum is None else self.gram_sum.add_(gram)

    def stats(self) -> InputStats:
        rows = torch.cat(self.rows) if self.rows else None
        gram = None if self.gram_sum is None else (self.gram_sum / self.count).float()
        return InputStats(self.amax, (self.abs_sum / self.count).float(), rows, gram)


def _feeds(graph: Graph, tokens: torch.Tensor) -> list[torch.Tensor]:
    """A stateless LLM graph's inputs for one window: tokens (and positions 0..T-1)."""
    names = [v.name for v in graph.inputs]
    if names == ["tokens"]:
        return [tokens.to(graph.inputs[0].type.dtype.torch)]
    if names == ["tokens", "positions"]:
        return [tokens.to(graph.inputs[0].type.dtype.torch),
                torch.arange(len(tokens), dtype=graph.inputs[1].type.dtype.torch)]
    raise ValueError(f"calibration runs a stateless graph taking (%tokens[, %positions]); @{graph.name} takes "
                     f"{', '.join(v.ref for v in graph.inputs)} (run the 'stateless' pipeline first)")


def calibrate(graph: Graph, samples: Iterable[torch.Tensor], *, device: str = "cpu", progress: bool = True,
              rows: int = 0, seed: int = 0, hessian: bool = False) -> Calibration:
    """Observe every linear's input and every attention's k/v over `samples` (token windows) on the
    reference interpreter; `rows` > 0 keeps about that many input rows of each linear, drawn
    evenly from the windows; `hessian` keeps the mean x x^T of each linear's input (GPTQ)."""
    linears, kv = linear_inputs(graph), kv_inputs(graph)
    if not linears:
        raise ValueError(f"@{graph.name} has no llm.linear with a parameter weight to calibrate")
    samples = list(samples)
    if not samples:
        raise ValueError("calibration got no samples")
    observed = graph.clone()
    names = [*linears, *kv]
    cloned = {**linear_inputs(observed), **kv_inputs(observed)}
    observed.set_outputs([cloned[n] for n in names])
    run = interpreter.compile(observed, device=device)
    observers = {n: _Observer() for n in names}
    per_window = math.ceil(rows / len(samples)) if rows > 0 else 0
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    for window in tqdm(samples, desc="calibrating" + (" (with X^T X)" if hessian else ""), unit="sample",
                       disable=not progress):
        outputs = run(*_feeds(graph, window))
        picks = torch.randperm(len(window), generator=gen)[:per_window].sort().values if per_window else None
        grams: dict[int, torch.Tensor] = {}   # linears reading one input share its x^T x
        for name, x in zip(names, outputs):
            if name in kv:
                channels = kv_channels(x)
                observers[name].update(channels, picks if len(channels) == len(window) else None)
                continue
            x = x.reshape(-1, x.shape[-1])
            gram = None
            if hessian:
                if id(linears[name]) not in grams:
                    xf = x.detach().float()
                    grams[id(linears[name])] = (xf.t() @ xf).cpu()
                gram = grams[id(linears[name])]
            observers[name].update(x, picks, gram)
    return {n: o.stats() for n, o in observers.items()}


def perplexity(graph: Graph, windows: Iterable[torch.Tensor], *, device: str = "cpu", progress: bool = False,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) of a stateless graph over token windows, on the reference interpreter."""
    from tqdm.auto import tqdm

    run, nll, n = interpreter.compile(graph, device=device), 0.0, 0
    for w in tqdm(list(windows), desc=desc, unit="window", disable=not progress, leave=False):
        logits = run(*_feeds(graph, w))[0].float().cpu()
        nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


# -- files ------------------------------------------------------------------------------------------

_MEAN, _ROWS, _GRAM = "|mean_abs", "|rows", "|gram"


def save_calibration(calib: Mapping[str, InputStats], path: str | os.PathLike) -> None:
    """Write the statistics as one safetensors file: per name its channel amax, mean |x| and rows."""
    from safetensors.torch import save_file

    tensors = {}
    for n, s in calib.items():
        tensors[n] = s.channel_amax.contiguous()
        if s.channel_mean_abs is not None:
            tensors[n + _MEAN] = s.channel_mean_abs.contiguous()
        if s.rows is not None:
            tensors[n + _ROWS] = s.rows.contiguous()
        if s.gram is not None:
            tensors[n + _GRAM] = s.gram.contiguous()
    save_file(tensors, os.fspath(path))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read what save_calibration wrote."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {os.fspath(path)} does not exist (write one with "
                                f"kiln.passes.calibrate.save_calibration or calibrate{{save=FILE}})")
    tensors = load_file(os.fspath(path))
    return {n: InputStats(t, tensors.get(n + _MEAN), tensors.get(n + _ROWS), tensors.get(n + _GRAM))
            for n, t in tensors.items() if not n.endswith((_MEAN, _ROWS, _GRAM))}


def token_stream(tokenizer: Any, *, text: str | None = None,
                 tokens: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """The stream calibration and evaluation windows come from: `tokens`, `text` tokenized, or
    (default) pydoc_data.topics."""
    if text is not None and tokens is not None:
        raise ValueError("give text or tokens, not both")
    if tokens is not None:
        return torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer: pass the model's tokenizer, or token ids (tokens=)")
    if text is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    return pydoc_tokens(tokenizer)


def calibrate_text(graph: Graph, tokenizer: Any, *, samples: int = 16, length: int = 128, text: str | None = None,
                   tokens: Sequence[int] | torch.Tensor | None = None, progress: bool = True, rows: int = 0,
                   device: str = "cpu", hessian: bool = False) -> Calibration:
    """Calibrate on `samples` windows of `length` tokens from the first half of `tokens`, of
    `text`, or (default) of pydoc_data.topics; the second half is left for evaluation."""
    stream = token_stream(tokenizer, text=text, tokens=tokens)
    return calibrate(graph, calib_windows(stream, samples, length), progress=progress, rows=rows, device=device,
                     hessian=hessian)


def describe(calibration: Calibration) -> str:
    """A one-line summary for remarks and logs."""
    kv = sum(n.startswith(("k_cache.", "v_cache.")) for n in calibration)
    with_rows = [s.rows.shape[0] for s in calibration.values() if s.rows is not None]
    with_gram = sum(s.gram is not None for s in calibration.values())
    return (f"{len(calibration) - kv} linear inputs and {kv // 2} attentions' k/v observed"
            + (f", {with_rows[0]} rows kept per linear input" if with_rows else "")
            + (f", X^T X kept for {with_gram} linear inputs" if with_gram else ""))


@register_pass("calibrate")
def calibrate_pass(graph: Graph, *, tokenizer: str = "", samples: int = 128, length: int = 256, text: str = "",
                   rows: int = 0, hessian: bool = False, device: str = "cpu", save: str = "", load: str = "") -> int:
    """Observe linear inputs and attention k/v over calibration text (pydoc_data.topics by default).

    tokenizer: the model (folder, .gguf, or short name) whose tokenizer reads the text; text: a text
    file instead of pydoc_data.topics; rows: input rows kept per linear (AWQ needs them); hessian: keep
    each linear input's mean x x^T (quantize{rounding=gptq} needs it); save: also write the statistics
    to this file; load: read statistics from a file instead of running."""
    if load:
        calibration = load_calibration(load)
    else:
        if not tokenizer:
            raise ValueError("calibrate needs a tokenizer to read its text: calibrate{tokenizer=MODEL} with MODEL "
                             "the model folder, .gguf file or short name (smollm2), or calibrate{load=FILE}")
        from ..frontends import resolve
        from ..frontends.hf import tokenizer_for

        body = None
        if text:
            with open(text) as f:
                body = f.read()
        stream = token_stream(tokenizer_for(resolve(tokenizer)), text=body)
        calibration = calibrate(graph, calib_windows(stream, samples, length), rows=rows, device=device,
                                hessian=hessian)
    if save:
        save_calibration(calibration, save)
    attach_calibration(graph, calibration)
    remark(f"calibration: {describe(calibration)}")
    return len(calibration)
