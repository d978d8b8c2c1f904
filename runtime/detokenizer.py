"""Streamed text for generated tokens: incremental detokenisation and stop strings.

Decoding one token at a time is wrong in two ways: a character split across byte tokens
decodes to U+FFFD until its last byte arrives, and SentencePiece-style decoders strip the
space a token starts with when nothing precedes it. So each step decodes a short window (the
tokens since the last emitted one that shows text, from a character boundary, plus the new
ones) and emits what the window's text gained, holding back a trailing U+FFFD until the
character completes. The text a request gets is what its tokens add to the prompt's text,
`decode(prompt + output)[len(decode(prompt)):]` (a prompt of ids that ends inside a character
lends those bytes to the output), without transformers' tokenization-space clean-up, which
rewrites text across token boundaries and so cannot be streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas, right for multi-byte characters."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self.prompt_len = len(self.ids)
        self.read_offset = self._prompt_end()  # text of tokens before this is fully emitted
        self.prefix_offset = self._window_start()  # the window decoded each step starts here
        self.prefix_len = len(self._decode(self.prefix_offset, self.read_offset))
        self.held = 0  # characters of the window past prefix_len already emitted
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _prompt_end(self) -> int:
        """The end of the prompt's last whole character: the bytes of one it leaves unfinished
        (a prompt of token ids can) become output text once the output completes it."""
        end = self.prompt_len
        while end > max(self.prompt_len - 3, 0) and self._decode(0, end).endswith(_REPLACEMENT):
            end -= 1
        return end

    def _window_start(self) -> int:
        """The nearest start before read_offset on a character boundary (byte-fallback decoders turn a
        whole run of byte tokens to U+FFFD when it starts mid-character) and with visible text
        before read_offset (else a decoder's strip of the first space hits the output)."""
        start = max(self.read_offset - 1, 0)
        for candidate in range(start, max(start - 8, 0), -1):
            before = self._decode(max(candidate - 16, 0), candidate)
            if not before.endswith(_REPLACEMENT) and self._decode(candidate, self.read_offset):
                return candidate
        return 0

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self.prompt_len:]

    def add(self, token_id: int) -> str:
        """Append one token; return the new text ("" while a character is incomplete)."""
        self.ids.append(token_id)
        window = self._decode(self.prefix_offset)
        complete = not window.endswith(_REPLACEMENT)
        stable = window if complete else window.rstrip(_REPLACEMENT)
        delta = stable[self.prefix_len + self.held:]
        if complete:
            emitted = self._decode(self.read_offset)
            # A window must start on a character and with a token that shows text: else byte-fallback
            # runs turn to U+FFFD, or the space the first visible token starts with is stripped.
            if not emitted or emitted.startswith(_REPLACEMENT):
                self.prefix_len = len(window)
            else:
                self.prefix_offset, self.prefix_len = self.read_offset, len(emitted)
            self.read_offset = len(self.ids)
            self.held = 0
        else:
            self.held += len(delta)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the request: release what is still held (an unfinished character's U+FFFD)."""
        window = self._decode(self.prefix_offset)
        delta = window[self.prefix_len + self.held:]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_len = self.held = 0
        self.text += delta
        return delta


class StopChecker:
    """Cuts streamed text at the first stop string, which may span tokens; while the text ends
    with the start of a stop string, those characters are held back from the stream."""

    def __init__(self, stop: Sequence[str] | None, include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in (stop or ()) if s]
        self.include = include_stop_str_in_output
        self.text = ""  # everything fed, uncut
        self.sent = 0  # characters of text already returned
        self.stopped: str | None = None  # the stop string that matched

    @property
    def output_text(self) -> str:
        """The request's text: cut at the stop string when one matched."""
        return self.text[: self.sent] if self.stopped is not None else self.text

    def feed(self, delta: str) -> str:
        """Append new text; return the part that is now safe to stream."""
        if self.stopped is not None:
            return ""
        start = max(len(self.text) - max((len(s) for s in self.stop), default=0) + 1, 0)
        self.text += delta
        match = self._first_match(start)
        if match is not None:
            begin, stop = match
            self.stopped = stop
            return self._release(begin + len(stop) if self.include else begin)
        return self._release(len(self.text) - (0 if self.include else self._partial_suffix()))

    def check(self, text: str) -> tuple[str, str] | None:
        """The whole text so far in (it must extend what came before); once a stop string has
        matched, the text cut there and that string."""
        self.feed(text[len(self.text):])
        return None if self.stopped is None else (self.output_text, self.stopped)

    def flush(self) -> str:
        """At the end of the request (no stop string matched): release the held characters."""
        return "" if self.stopped is not None else self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _first_match(self, start: int) -> tuple[int, str] | None:
        """The match that completes first (then the longest), as a character-by-character stream would see it."""
        best = None
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0:
                key = (at + len(stop), -len(stop))
                if best is None or key < best[0]:
                    best = (key, (at, stop))
        return None if best is None else best[1]

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
