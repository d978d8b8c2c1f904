"""Token selection for the decode loop: sampling parameters, penalties, filters, seeded draws,
logprobs and beam-search scoring.

Semantics, chosen to match the peers a user compares against:

- `sample` processes a row in transformers' order: penalties on the raw logits (repetition
  over prompt+output as transformers and vLLM define it, then frequency and presence over the
  output as OpenAI defines them), min_tokens suppression, then greedy argmax, or temperature
  followed by top-k, top-p and min-p (transformers' warper order) and one draw.
- Logprobs are *raw*: log_softmax of the model's logits before any penalty, temperature or
  filter (vLLM's default `raw_logprobs`), so they describe the model, not the sampler.
- A draw is a Gumbel-max race, argmax(logits/T + G) with G = -log(-log(U)), U ~ uniform from the
  request's own generator: one `vocab`-sized draw per step, so a seeded request samples the same
  tokens alone or in any batch. Greedy rows draw nothing.
- Beam search follows transformers 5 (`GenerationMixin._beam_search`): scores are sums of
  processed log-probs (penalties applied *after* log_softmax, see `beam_logprobs`), each step
  keeps the top `max(2, 1 + num_eos) * beam_width` candidates over all beams, and a finished
  hypothesis scores sum_logprobs / generated_length ** length_penalty.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..backends.transfer import to_device


def _fail(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"SamplingParams.{field}={value!r} is invalid: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # tokens seen in prompt+output: logit > 0 divided, < 0 multiplied
    presence_penalty: float = 0.0  # subtracted once from every token present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings, cut from the text unless include_stop_str_in_output
    stop_token_ids: list[int] | None = None
    end_id: int | None = None  # replaces the tokenizer's eos
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per generated token (0: only the sampled token's)
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        """Reject bad values here, naming the field, so a request fails before it is scheduled."""
        for field, low in (("max_tokens", 1), ("min_tokens", 0), ("n", 1), ("beam_width", 1)):
            value = getattr(self, field)
            if not _is_int(value) or value < low:
                raise _fail(field, value, f"must be an int >= {low}")
        if self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise _fail("temperature", self.temperature, "must be a finite float >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _fail("top_k", self.top_k, "must be an int >= 1, or 0 or -1 for no top-k")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise _fail("top_p", self.top_p, "must be a float in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise _fail("min_p", self.min_p, "must be a float in [0, 1]")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _fail("repetition_penalty", self.repetition_penalty, "must be a finite float > 0 (1 is off)")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not _is_real(value) or not -2 <= value <= 2:
                raise _fail(field, value, "must be a float in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise _fail("seed", self.seed, "must be None or an int in [0, 2**64)")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and (not isinstance(stop, (list, tuple))
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise _fail("stop", self.stop, "must be None, a non-empty str or a list of non-empty str")
        self.stop = None if stop is None else list(stop)
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise _fail("stop_token_ids", self.stop_token_ids, "must be None or a list of ints >= 0")
        if self.end_id is not None and (not _is_int(self.end_id) or self.end_id < 0):
            raise _fail("end_id", self.end_id, "must be None or an int >= 0")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 0):
                raise _fail(field, value, "must be None or an int >= 0")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise _fail("best_of", self.best_of, f"must be None or an int >= n ({self.n})")
        if not _is_real(self.length_penalty):
            raise _fail("length_penalty", self.length_penalty, "must be a finite float")
        for field in ("ignore_eos", "use_beam_search", "early_stopping", "include_stop_str_in_output",
                      "skip_special_tokens"):
            if not isinstance(getattr(self, field), bool):
                raise _fail(field, getattr(self, field), "must be a bool")
        if self.beam_width > 1 and not self.use_beam_search:
            raise _fail("beam_width", self.beam_width, "must be 1 unless use_beam_search=True")
        if self.use_beam_search and self.n > self.beam_width:
            raise _fail("n", self.n, f"must be <= beam_width ({self.beam_width}) with beam search")
        if self.greedy and not self.use_beam_search and (self.n > 1 or (self.best_of or 1) > 1):
            field = "n" if self.n > 1 else "best_of"
            raise _fail(field, getattr(self, field), "must be 1 with temperature=0 (greedy samples are identical)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def finish_ids(self, eos_ids: int | Iterable[int] | None = None) -> frozenset[int]:
        """The token ids that end this request: end_id (else the tokenizer's eos) unless ignore_eos,
        plus stop_token_ids."""
        ids = set(self.stop_token_ids or ())
        if not self.ignore_eos:
            if self.end_id is not None:
                ids.add(self.end_id)
            elif eos_ids is not None:
                ids.update([eos_ids] if isinstance(eos_ids, int) else eos_ids)
        return frozenset(ids)


@dataclass
class SampledTokens:
    """One row per sequence sampled this step; logprobs are raw (see the module docstring)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]


def request_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own random stream (None without a seed: draws then come from torch's default)."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def _flat_indices(ids: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(row) for row in ids])
    rows = torch.repeat_interleave(torch.arange(len(ids)), lengths).to(device)
    tokens = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=device)
    return rows, tokens


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Repetition, then frequency and presence penalties, as a new f32 tensor (vLLM's order)."""
    out = logits.float().clone()
    device = out.device
    repetition = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in repetition):
        seen = torch.zeros(out.shape, dtype=torch.bool, device=device)
        seen[_flat_indices([list(a) + list(b) for a, b in zip(prompt_ids, output_ids)], device)] = True
        penalty = torch.tensor(repetition, device=device)[:, None]
        out = torch.where(seen, torch.where(out > 0, out / penalty, out * penalty), out)
    frequency = [p.frequency_penalty for p in params]
    presence = [p.presence_penalty for p in params]
    if any(frequency) or any(presence):
        counts = torch.zeros(out.shape, device=device)
        rows, tokens = _flat_indices(output_ids, device)
        counts.index_put_((rows, tokens), torch.ones(len(tokens), device=device), accumulate=True)
        out -= torch.tensor(frequency, device=device)[:, None] * counts
        out -= torch.tensor(presence, device=device)[:, None] * (counts > 0)
    return out


def _on(device: torch.device, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """A small host list on `device` without waiting for the device (a blocking copy would wait for
    the step in flight)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask to -inf what each row's top-k, then top-p nucleus, then min-p floor excludes
    (transformers' order; ties with the k-th logit are kept). Expects temperature applied."""
    rows, vocab = logits.shape
    device = logits.device
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if all(k >= vocab for k in top_k) and all(p == 1.0 for p in top_p) and not any(min_p):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    kth = ordered.gather(1, _on(device, top_k, torch.int64).clamp(max=vocab)[:, None] - 1)
    keep = ordered >= kth
    probs = ordered.masked_fill(~keep, -math.inf).softmax(dim=-1)
    mass_ahead = probs.cumsum(dim=-1) - probs
    keep &= mass_ahead < _on(device, top_p, torch.float32)[:, None]
    keep[:, 0] = True
    probs = ordered.masked_fill(~keep, -math.inf).softmax(dim=-1)
    keep &= probs >= _on(device, min_p, torch.float32)[:, None] * probs[:, :1]
    mask = torch.empty_like(keep).scatter_(1, order, keep)
    return logits.masked_fill(~mask, -math.inf)


def suppress_finish(logits: torch.Tensor, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]],
                    eos_ids: Sequence[int | Iterable[int] | None] | None) -> torch.Tensor:
    """While a row has fewer than min_tokens outputs, its finishing ids get -inf (in place)."""
    for row, (p, out) in enumerate(zip(params, output_ids)):
        if len(out) < p.min_tokens:
            ids = p.finish_ids(eos_ids[row] if eos_ids is not None else None)
            if ids:
                logits[row, sorted(ids)] = -math.inf
    return logits


def top_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int],
                 num_top: Sequence[int | None]) -> list[dict[int, float] | None]:
    """Per row, the `num_top` most likely tokens and the chosen one, with their logprobs (vLLM's shape)."""
    wanted = [k for k in num_top if k is not None]
    if not wanted:
        return [None] * len(num_top)
    k = min(max(wanted), logprobs.shape[-1])
    values, indices = logprobs.topk(k, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, dtype=torch.long, device=logprobs.device)[:, None])
    chosen = chosen[:, 0].tolist()
    values, indices = values.tolist(), indices.tolist()
    out: list[dict[int, float] | None] = []
    for row, n in enumerate(num_top):
        if n is None:
            out.append(None)
            continue
        top = dict(zip(indices[row][:n], values[row][:n]))
        top[token_ids[row]] = chosen[row]
        out.append(top)
    return out


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], num_top: int) -> list[dict[int, float] | None]:
    """Raw logprobs of each prompt token given the ones before it (None for the first, as vLLM)."""
    logprobs = torch.log_softmax(logits[: len(prompt_ids) - 1].float(), dim=-1)
    rows = top_logprobs(logprobs, list(prompt_ids[1:]), [num_top] * (len(prompt_ids) - 1))
    return [None, *rows]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
           output_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None],
           eos_ids: Sequence[int | Iterable[int] | None] | None = None) -> SampledTokens:
    """Pick one token per row; `eos_ids` (per row, the tokenizer's eos) feeds min_tokens suppression."""
    rows, vocab = logits.shape
    if all(map(samples_on_device, params, output_ids, generators)):  # serving's common case
        return SampledTokens(sample_on_device(logits, params).tolist(), [0.0] * rows, [None] * rows)
    raw = torch.log_softmax(logits.float(), dim=-1)
    processed = apply_penalties(logits, params, prompt_ids, output_ids)
    suppress_finish(processed, params, output_ids, eos_ids)
    tokens = processed.argmax(dim=-1)
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        uniform = torch.empty(len(drawn), vocab, device=logits.device)
        shared = [i for i, row in enumerate(drawn) if generators[row] is None]
        if shared:
            uniform[shared] = torch.rand(len(shared), vocab, device=logits.device)
        for i, row in enumerate(drawn):
            if generators[row] is not None:
                generator = generators[row]  # drawn where it lives: a CPU generator serves GPU logits too
                uniform[i] = torch.rand(vocab, generator=generator, device=generator.device).to(logits.device)
        index = _on(logits.device, drawn, torch.int64)
        tokens[index] = _gumbel_draw(processed[index], [params[row] for row in drawn], uniform)
    token_ids = tokens.tolist()
    chosen = raw.gather(1, tokens[:, None])[:, 0].tolist()
    return SampledTokens(token_ids, chosen, top_logprobs(raw, token_ids, [p.logprobs for p in params]))


def samples_on_device(p: SamplingParams, output_ids: Sequence[int], generator: torch.Generator | None) -> bool:
    """Whether a row's token needs nothing from the host: no logprobs to report (the chosen one is left
    0), no penalties, min_tokens reached, and greedy or drawn from torch's default generator."""
    start = device_sampling_from(p, generator)
    return start is not None and len(output_ids) >= start


def device_sampling_from(p: SamplingParams, generator: torch.Generator | None) -> int | None:
    """From how many outputs on a request's rows `samples_on_device` (None: never); fixed for the
    request's life, so an engine asks once."""
    if (p.logprobs is None and p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
            and (p.greedy or generator is None)):
        return p.min_tokens
    return None


def sample_on_device(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The tokens of rows that `samples_on_device`, left where the logits are (no wait on the device):
    an argmax, or temperature, the filters and one Gumbel draw (as `sample` draws them)."""
    tokens = logits.argmax(dim=-1)
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        index = _on(logits.device, drawn, torch.int64)
        uniform = torch.rand(len(drawn), logits.shape[1], device=logits.device)
        tokens[index] = _gumbel_draw(logits.index_select(0, index).float(), [params[row] for row in drawn], uniform)
    return tokens


def _gumbel_draw(x: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of f32 logits x: temperature, the filters, then the Gumbel-max race on `uniform`."""
    temperature = _on(x.device, [p.temperature for p in params], torch.float32)[:, None]
    x = filter_logits((x - x.max(dim=-1, keepdim=True).values) / temperature, params)  # <= 0: a tiny T cannot overflow
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))
    return (x + gumbel).argmax(dim=-1)


def beam_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                  output_ids: Sequence[Sequence[int]],
                  eos_ids: Sequence[int | Iterable[int] | None] | None = None) -> torch.Tensor:
    """Per-beam scores to add, as transformers' beam search makes them: log_softmax first, then the
    penalties and min_tokens suppression applied to the log-probs."""
    return suppress_finish(apply_penalties(torch.log_softmax(logits.float(), dim=-1), params, prompt_ids, output_ids),
                           params, output_ids, eos_ids)


def beam_step(logprobs: torch.Tensor, beam_scores: Sequence[float], beam_width: int,
              num_eos: int = 1) -> list[tuple[int, int, float]]:
    """The best (parent beam, token, new summed score) candidates over all beams, best first:
    `max(2, 1 + num_eos) * beam_width` of them, as transformers keeps, so that enough survive
    when some end the hypothesis."""
    beams, vocab = logprobs.shape
    scores = torch.tensor(beam_scores, dtype=torch.float32, device=logprobs.device)
    total = (logprobs.float() + scores[:, None]).reshape(-1)
    values, indices = total.topk(min(max(2, 1 + num_eos) * beam_width, total.numel()))
    return [(i // vocab, i % vocab, v) for i, v in zip(indices.tolist(), values.tolist())]


def length_penalized_score(sum_logprobs: float, length: int, length_penalty: float) -> float:
    """A finished hypothesis's score as transformers ranks it: the summed log-probs (in f32) over
    generated_length ** length_penalty, where the length counts the generated tokens including
    the one that ended it and excludes the prompt."""
    return (torch.tensor(sum_logprobs, dtype=torch.float32) / (length**length_penalty)).item()


class BeamSearch:
    """One request's beam search, with transformers' bookkeeping: candidates from `beam_step`,
    running beams are the best that did not finish, and a candidate that finishes is kept only
    if it ranks among the first `beam_width` and beats the worst of the `beam_width` kept."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, finish_ids: Collection[int],
                 max_length: int) -> None:
        self.prompt_len, self.params, self.max_length = len(prompt_ids), params, max_length
        self.finish_ids, self._width = frozenset(finish_ids), params.beam_width
        self.beams: list[list[int]] = [list(prompt_ids)]  # running sequences, prompt included
        self.scores: list[float] = [0.0]
        self.finished: list[tuple[float, list[int]]] = []  # (penalised score, sequence), best first
        self.improvable = True
        self.done = False

    def step(self, logprobs: torch.Tensor) -> list[int]:
        """Advance on `beam_logprobs` of the running beams ([len(self.beams), vocab]); returns, per new
        running beam, the index of the old beam it extends (to fork its KV cache)."""
        width, cur_len = self._width, len(self.beams[0])
        candidates = beam_step(logprobs, self.scores, width, num_eos=len(self.finish_ids))
        last = cur_len + 1 >= self.max_length
        ends = [last or token in self.finish_ids for _, token, _ in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (ends[i], -candidates[i][2], i))[:width]
        if self.improvable and not (self.params.early_stopping and len(self.finished) == width):
            for i, (parent, token, score) in enumerate(candidates[:width]):
                if ends[i]:
                    penalised = length_penalized_score(score, cur_len + 1 - self.prompt_len, self.params.length_penalty)
                    self.finished.append((penalised, self.beams[parent] + [token]))
            self.finished = sorted(self.finished, key=lambda f: -f[0])[:width]
        self.beams = [self.beams[candidates[i][0]] + [candidates[i][1]] for i in order]
        self.scores = [candidates[i][2] + (-1e9 if ends[i] else 0.0) for i in order]
        parents = [candidates[i][0] for i in order]
        generated = cur_len + 1 - self.prompt_len
        if self.improvable and len(self.finished) == width:  # transformers' heuristic: the best running
            best = torch.tensor(self.scores[0], dtype=torch.float32) / generated**self.params.length_penalty
            self.improvable = bool(best > self.finished[-1][0])  # beam, scored at today's length
        self.done = (not self.improvable or all(ends)
                     or (self.params.early_stopping and len(self.finished) == width))
        return parents

    def best(self, n: int) -> list[tuple[float, list[int]]]:
        """The n best finished hypotheses (score, generated tokens), as transformers returns them."""
        return [(score, seq[self.prompt_len:]) for score, seq in self.finished[:n]]
