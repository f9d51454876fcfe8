#!/usr/bin/env python3
"""Ask a trained fixture freshly generated questions through its (e.g. INT4) ONNX graphs and through PyTorch
FP32, and compare the answers. Independent of vlmforge's runtime and validators: the graphs run through
scripts/independent_check.py's own loop (HF image processor, HF get_rope_index, onnxruntime); vlmforge is used
only for the synthetic question generator, with seeds past the held-out range the build checks.

    python scripts/task_check.py artifacts/trained-qwen2_5_vl/int4-112 --checkpoint .work/fixtures/trained-qwen2_5_vl-<hash>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from independent_check import Graphs  # noqa: E402

from vlmforge.fixtures.task import heldout_examples, normalise_answer  # noqa: E402  (data only)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=100_000, help="seed offset into the held-out range (fresh questions)")
    ap.add_argument("--max-drop", type=float, default=0.02, help="allowed accuracy drop vs PyTorch FP32")
    args = ap.parse_args()
    g = Graphs(args.artifacts, args.checkpoint)
    right_o = right_t = same = 0
    examples = heldout_examples(args.n, g.size, offset=args.offset)
    for ex in examples:
        ids, pv, grid, _ = g.inputs(ex.image, ex.question)
        dec = lambda toks: normalise_answer(g.tok.decode([t for t in toks if t not in g.eos], skip_special_tokens=True))  # noqa: E731
        a, b = dec(g.onnx_generate(ids, pv, grid, 6, 0)), dec(g.hf_generate(ids, pv, grid, 6, 0))
        right_o += a == ex.answer
        right_t += b == ex.answer
        same += a == b
    n = len(examples)
    print(f"{n} fresh questions: ONNX {right_o / n:.1%}, PyTorch FP32 {right_t / n:.1%}, same answer {same / n:.1%}")
    return 0 if (right_t - right_o) / n <= args.max_drop else 1


if __name__ == "__main__":
    sys.exit(main())
