"""Incremental detokenization with stop strings: token ids in, text pieces out, as tokens arrive."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Token ids in, text pieces out, as tokens arrive.

    Byte-level BPE splits multi-byte characters over several tokens; a piece is released only when
    the decoded text no longer ends in U+FFFD (an incomplete UTF-8 sequence). Text that could be the
    start of a stop string is held back until it is known not to be one; the text ends before the first
    stop string. The concatenation of all pieces equals `tokenizer.decode(tokens)` (up to a stop string).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.done = False  # a stop string was reached
        self._prefix = 0
        self._read = 0
        self._pending = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        if self.done:
            return ""
        self.tokens.append(int(token))
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return self._release(after[len(before):], final=False)

    def finish(self) -> str:
        """Release what is still held (an incomplete character decodes as U+FFFD, as a full decode does)."""
        if self.done:
            return ""
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return self._release(after[len(before):], final=True)

    def _release(self, delta: str, final: bool) -> str:
        self._pending += delta
        out = self._pending
        if self.stop:
            hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.done = self._pending[:min(hits)], True
            elif not final:
                keep = max((k for s in self.stop for k in range(1, min(len(s), len(out) + 1))
                            if out.endswith(s[:k])), default=0)
                out = out[:len(out) - keep]
        self._pending = self._pending[len(out):] if not self.done else ""
        self.text += out
        return out
