"""The benchmark's report: the markdown table of a model's rows, and the speed ratios the targets are read
from (ref time / our time: > 1 means the vlmforge runtime is faster)."""

from __future__ import annotations

import dataclasses

from vlmforge.bench.row import BUILDER, EAGER, GENAI, RUNTIME, ReadRow, Row


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table_lines(title: str, rows: list, pasts=()) -> list[str]:
    """The table of one model's rows: a column pair (ms/token, bandwidth share) per past length."""
    head = ["variant", "precision", "vision ms", "TTFT ms", "prefill ms", "decode tok/s"]
    for p in pasts:
        head += [f"ms/token @{p}", f"BW share @{p}"]
    lines = [f"\n## {title}", " | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if isinstance(r, ReadRow):
            lines += _read_lines(r, pasts)
        elif not r.measured:
            lines.append(f"{r.variant} | {r.precision or ''} | skipped: {r.skipped}")
        else:
            lines += _row_lines(r, pasts)
    return lines


def _read_lines(r: ReadRow, pasts) -> list[str]:
    """The denominator of the shares, per phase: ms (GB/s)."""
    lines, gb_s = [], r.read_gb_s
    for phase, times in r.read_ms_at_past.items():
        cells = [f"{r.variant}, {phase}", r.precision, "", "", "", ""]
        for p in pasts:
            ms, gbs = times.get(p), gb_s[phase].get(p)
            cells += [_fmt(ms, ".2f"), f"{gbs:.1f} GB/s" if gbs else "-"]
        lines.append(" | ".join(cells))
    return lines


def _row_lines(r: Row, pasts) -> list[str]:
    cells = [r.label, r.precision or "", _fmt(r.vision_ms), _fmt(r.ttft_ms), _fmt(r.prefill_ms), _fmt(r.decode_tok_s)]
    for p in pasts:
        cells += [_fmt(r.step_ms_at_past.get(p), ".2f"), _fmt((r.bandwidth_share or {}).get(p), ".0%")]
    lines = [" | ".join(cells)]
    if r.step_ms_at_past_phase2:
        cells = [f"{r.label}, steps interleaved with the runtime at its thread count", "", "", "", "", ""]
        for p in pasts:
            cells += [_fmt(r.step_ms_at_past_phase2.get(p), ".2f"),
                      _fmt((r.bandwidth_share_phase2 or {}).get(p), ".0%")]
        lines.append(" | ".join(cells))
    return lines


def print_table(title: str, rows: list, pasts=()) -> None:
    print("\n".join(table_lines(title, rows, pasts)))


def _ratio(ours: Row, ref: Row, pasts, with_ttft: bool = True) -> dict:
    """ref time / our time (> 1: ours is faster), for every quantity both rows have."""
    entry = {"decode_tok_s": ours.decode_tok_s / ref.decode_tok_s}
    if with_ttft:
        for key, name in (("ttft_ms", "ttft"), ("prefill_ms", "prefill"), ("vision_ms", "vision")):
            if getattr(ours, key) and getattr(ref, key):
                entry[name] = getattr(ref, key) / getattr(ours, key)
    for p in pasts:
        a, b = ours.step_ms_at_past.get(p), ref.step_ms_at_past.get(p)
        if a and b:
            entry[f"decode_at_past_{p}"] = b / a
    return entry


def _pick(rows: list, precision, variant: str, kv_mode: str = "preallocated", threads: int = 0) -> Row | None:
    for r in rows:
        if isinstance(r, ReadRow) or r.variant != variant or r.precision != precision or not r.measured:
            continue
        if variant != RUNTIME or r.is_runtime(kv_mode, threads):
            return r
    return None


def _phase2(r: Row | None) -> Row | None:
    """The row with its phase-2 step times (timed against the runtime at genai's thread count), if any."""
    return dataclasses.replace(r, step_ms_at_past=r.step_ms_at_past_phase2 or r.step_ms_at_past) if r else None


def ratios(rows: list, pasts=()) -> dict:
    """Per precision: the runtime (preallocated KV, all cores) vs eager and vs genai on the same artifacts,
    the runtime at genai's thread count vs genai and vs the genai builder's own model, and the IO-binding
    KV cache vs plain session.run; plus each lower precision's speed-up over FP32."""
    out = {}
    runs = [r for r in rows if isinstance(r, Row) and r.measured]
    for precision in dict.fromkeys(r.precision for r in rows if r.measured):
        ours, eager, genai = (_pick(rows, precision, v) for v in (RUNTIME, EAGER, GENAI))
        builder = next((r for r in runs if r.variant.startswith(BUILDER) and r.precision == precision), None)
        single = next((r for r in runs if r.kind == "runtime" and r.threads and r.precision == precision), None)
        pairs = {"runtime vs PyTorch eager": (ours, eager), "runtime vs onnxruntime-genai": (ours, genai),
                 "runtime vs onnxruntime-genai, same intra-op threads": (single, _phase2(genai)),
                 "runtime vs the onnxruntime-genai builder's model, same intra-op threads": (single, _phase2(builder))}
        for name, (a, b) in pairs.items():
            if a and b:
                out[f"{precision}: {name}"] = _ratio(a, b, pasts)
        base = _pick(rows, precision, RUNTIME, kv_mode="numpy")
        if ours and base:
            out[f"{precision}: IO binding (preallocated) vs numpy session.run"] = _ratio(ours, base, pasts, with_ttft=False)
        fp32 = _pick(rows, "fp32", RUNTIME)
        if precision != "fp32" and ours and fp32:
            out[f"{precision} vs fp32: runtime"] = _ratio(ours, fp32, pasts)
    return out


def print_ratios(r: dict) -> None:
    for name, entry in r.items():
        print(f"  {name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in entry.items()))


def print_vision_dynamic(v: dict) -> None:
    """The vision=dynamic timing: against the fixed graph on the same image, then by image size."""
    f = v["versus_fixed"]
    print(f"  vision=dynamic at {f['image_size']} px: {f['dynamic_ms']:.0f} ms, fixed graph {f['fixed_ms']:.0f} ms "
          f"(dynamic / fixed x{f['ratio']:.2f}; features max |diff| {f['max_abs_diff']:.1e})")
    print(f"  vision=dynamic by image size (pixel budget {v['min_pixels']}-{v['max_pixels']}):")
    for s in v["sizes"]:
        w, h = s["image"]
        print(f"    {w}x{h}: grid {s['grid_thw']}, {s['patches']} patches: {s['dynamic_ms']:.0f} ms "
              f"({s['dynamic_ms'] / s['patches'] * 1e3:.0f} ms per 1k patches), PyTorch {s['pytorch_ms']:.0f} ms "
              f"(PyTorch / dynamic x{s['ratio_pytorch_over_dynamic']:.2f}; max |diff| {s['max_abs_diff']:.1e})")
