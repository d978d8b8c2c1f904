"""Calibration: run a stateless graph on the reference interpreter over sample text and record,
for every `llm.linear`, the absolute maximum of its input (per tensor and per input channel).

The default text is Python's own `pydoc_data.topics`, tokenized once; calibration windows are
taken from its start and evaluation windows (`eval_windows`) from its end, so the two never
overlap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import interpreter
from ..ir.graph import Graph, Value


@dataclass(frozen=True)
class InputStats:
    """What calibration saw at one linear's input: |x| max per input channel (the last dim)."""

    channel_amax: torch.Tensor   # f32[K]

    @property
    def amax(self) -> float:
        return float(self.channel_amax.max())


Calibration = dict[str, InputStats]
"""Weight parameter name -> statistics of the input of the linear(s) that use it."""


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
                         f"the {len(tokens)} are for calibration (the other half is held out for evaluation)")


def linear_inputs(graph: Graph) -> dict[str, Value]:
    """Weight parameter name -> the input of an `llm.linear` reading that weight."""
    out: dict[str, Value] = {}
    for op in graph.ops:
        if op.name == "llm.linear" and op.operands[1].is_param:
            out.setdefault(op.operands[1].name, op.operands[0])
    return out


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


def calibrate(graph: Graph, samples: Iterable[torch.Tensor], *, device: str = "cpu",
              progress: bool = True) -> Calibration:
    """Observe every linear's input over `samples` (token windows) on the reference interpreter."""
    probes = linear_inputs(graph)
    if not probes:
        raise ValueError(f"@{graph.name} has no llm.linear with a parameter weight to calibrate")
    observed = graph.clone()
    names = list(probes)
    cloned = linear_inputs(observed)
    observed.set_outputs([cloned[n] for n in names])
    run = interpreter.compile(observed, device=device)
    amax: dict[str, torch.Tensor] = {}
    samples = list(samples)
    from tqdm.auto import tqdm

    for window in tqdm(samples, desc="calibrating", unit="sample", disable=not progress):
        for name, x in zip(names, run(*_feeds(graph, window))):
            a = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0).cpu()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
    if not amax:
        raise ValueError("calibration got no samples")
    return {n: InputStats(a) for n, a in amax.items()}


def perplexity(graph: Graph, windows: Iterable[torch.Tensor], *, device: str = "cpu") -> float:
    """exp(mean next-token NLL) of a stateless graph over token windows, on the reference interpreter."""
    run, nll, n = interpreter.compile(graph, device=device), 0.0, 0
    for w in windows:
        logits = run(*_feeds(graph, w))[0].float().cpu()
        nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def save_calibration(calib: Mapping[str, InputStats], path: str | os.PathLike) -> None:
    """Write per-channel input amax as a safetensors file, one tensor per weight name."""
    from safetensors.torch import save_file

    save_file({n: s.channel_amax.contiguous() for n, s in calib.items()}, os.fspath(path))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read what save_calibration wrote."""
    from safetensors.torch import load_file

    return {n: InputStats(t) for n, t in load_file(os.fspath(path)).items()}


def calibrate_text(graph: Graph, tokenizer: Any, *, samples: int = 16, length: int = 128, text: str | None = None,
                   tokens: Sequence[int] | torch.Tensor | None = None, progress: bool = True) -> Calibration:
    """Calibrate on `samples` windows of `length` tokens from the first half of `tokens`, of
    `text`, or (default) of pydoc_data.topics; the second half is left for evaluation."""
    if text is not None and tokens is not None:
        raise ValueError("give text or tokens, not both")
    if text is not None:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = pydoc_tokens(tokenizer) if tokens is None else torch.as_tensor(tokens, dtype=torch.int64)
    return calibrate(graph, calib_windows(stream, samples, length), progress=progress)
