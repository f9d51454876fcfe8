"""The benchmark's rows: one measured variant of one artifact set (`Row`), or the memory-read denominator
of the bandwidth shares (`ReadRow`). `to_json` writes the keys `artifacts/bench.json` has always held, in
the same order, so readers of the JSON see no difference."""

from __future__ import annotations

from dataclasses import dataclass, field

RUNTIME = "vlmforge runtime"
EAGER = "PyTorch eager"
GENAI = "onnxruntime-genai"
BUILDER = "onnxruntime-genai builder"
READ = "memory read"

# JSON key order per kind of row, as each measurement wrote it ("@" marks where the keys that bench_model
# adds later go: the phase-2 step times, the precision and the bandwidth shares).
_ORDER = {
    "runtime": ("variant", "kv_mode", "threads", "vision_ms", "ttft_ms", "prefill_ms", "decode_tok_s",
                "prompt_tokens", "step_ms_at_past", "@"),
    "eager": ("variant", "vision_ms", "ttft_ms", "decode_tok_s", "step_ms_at_past", "threads", "@"),
    "genai": ("variant", "step_key", "vision_ms", "ttft_ms", "decode_tok_s", "step_ms_at_past", "threads", "note", "@"),
    "builder": ("variant", "step_key", "vision_ms", "ttft_ms", "prefill_ms", "decode_tok_s", "step_ms_at_past",
                "threads", "builder_dir", "note", "@"),
    "skipped": ("variant", "skipped", "@"),
    "skipped_all": ("variant", "precision", "skipped"),
}
_LATER = ("step_ms_at_past_phase2", "precision", "bandwidth_share", "bandwidth_share_vs_best",
          "bandwidth_share_phase2", "bandwidth_share_vs_best_phase2")


@dataclass
class Row:
    """One variant's timings on one artifact set.

    kind: runtime | eager | genai | builder | skipped | skipped_all (a whole precision skipped).
    threads: onnxruntime intra-op threads (runtime rows: 0 = all cores). step_key: the name genai-driven
    rows are timed under in `measure.steps_at_pasts`. step_ms_at_past_phase2 is None unless timed.
    """

    kind: str
    variant: str
    precision: str | None = None
    kv_mode: str | None = None
    threads: int | None = None
    vision_ms: float | None = None
    ttft_ms: float | None = None
    prefill_ms: float | None = None
    decode_tok_s: float | None = None
    prompt_tokens: int | None = None
    step_key: str | None = None
    note: str | None = None
    builder_dir: str | None = None
    skipped: str | None = None
    step_ms_at_past: dict = field(default_factory=dict)
    step_ms_at_past_phase2: dict | None = None
    bandwidth_share: dict | None = None
    bandwidth_share_vs_best: dict | None = None
    bandwidth_share_phase2: dict | None = None
    bandwidth_share_vs_best_phase2: dict | None = None

    @classmethod
    def skip(cls, variant: str, why: str, precision: str | None = None) -> "Row":
        """A variant that was not measured, and why (with `precision`: the whole precision)."""
        return cls("skipped_all" if precision is not None else "skipped", variant, precision=precision, skipped=why)

    @property
    def measured(self) -> bool:
        return self.skipped is None

    def is_runtime(self, kv_mode: str = "preallocated", threads: int = 0) -> bool:
        return self.kind == "runtime" and self.kv_mode == kv_mode and self.threads == threads

    @property
    def step_lookup(self) -> tuple:
        """The key of this row's decode steps in the result of `measure.steps_at_pasts` (phase 1)."""
        if self.step_key is not None:
            return (self.step_key, None, 1)
        return (self.variant, self.kv_mode, self.threads if self.kind == "runtime" else None)

    @property
    def label(self) -> str:
        """The table's name of the row: the variant, with the KV mode and thread count of runtime rows."""
        if self.kind != "runtime":
            return self.variant
        return self.variant + f" (KV {self.kv_mode}" + (f", {self.threads} thread(s))" if self.threads else ")")

    def to_json(self) -> dict:
        out = {}
        for key in _ORDER[self.kind]:
            if key == "@":
                out.update((k, getattr(self, k)) for k in _LATER if getattr(self, k) is not None)
            else:
                out[key] = getattr(self, key)
        return out


@dataclass
class ReadRow:
    """The time to read, once, the bytes a decode step must read ({past: bytes}), per phase of the round
    robin ({"phase 1" / "phase 2": {past: ms}}), and the bandwidth that gives ({phase: {past: GB/s}})."""

    precision: str
    read_bytes: dict
    read_ms_at_past: dict
    variant: str = "memory read (the bandwidth limit)"

    @property
    def read_gb_s(self) -> dict:
        return {ph: {p: self.read_bytes[p] / (ms / 1e3) / 1e9 for p, ms in v.items()}
                for ph, v in self.read_ms_at_past.items()}

    @property
    def measured(self) -> bool:
        return True

    def to_json(self) -> dict:
        return {"variant": self.variant, "precision": self.precision, "read_bytes": self.read_bytes,
                "read_ms_at_past": self.read_ms_at_past, "read_gb_s": self.read_gb_s}
