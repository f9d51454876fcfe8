"""Task accuracy on a trained fixture: the quality gate that random tiny models cannot provide.

Held-out questions (images and questions the fixture never saw in training) are asked through the ONNX
chain (vlmforge's own preprocessing, positions and loop, greedy) and through PyTorch FP32 (HF generate);
the gate is the drop in accuracy, in points, of the ONNX artifacts against PyTorch FP32.
"""

from __future__ import annotations

import logging

import numpy as np

from vlmforge.runtime.engine import Engine
from vlmforge.runtime.loop import PromptInputs, generate_tokens, greedy
from vlmforge.validators.chain import token_ids
from vlmforge.validators.metrics import gate
from vlmforge.validators.reference import Reference
from vlmforge.validators.results import CheckResult

log = logging.getLogger(__name__)
MAX_ANSWER_TOKENS = 6


def onnx_answerer(engine: Engine, ref: Reference):
    ids = token_ids(ref)

    def answer(image, question: str) -> str:
        prompt = np.asarray(ref.prompt_ids(question, 1), np.int64)
        tokens = [t for t, _ in generate_tokens(engine, PromptInputs(prompt, (ref.params.patches(image),)), ids,
                                                 max_new_tokens=MAX_ANSWER_TOKENS, choose=greedy)]
        return ref.tokenizer.decode([t for t in tokens if t not in ids.eos], skip_special_tokens=True)

    return answer


def torch_answerer(ref: Reference):
    ids = token_ids(ref)

    def answer(image, question: str) -> str:
        prompt = np.asarray([ref.prompt_ids(question, 1)], np.int64)
        pv, grid = ref.hf_pixels(image)
        tokens, _ = ref.generate(prompt, pv, grid, MAX_ANSWER_TOKENS, stop_at_eos=True)
        return ref.tokenizer.decode([t for t in tokens if t not in ids.eos], skip_special_tokens=True)

    return answer


def reference_task(ref: Reference, n: int) -> list[str]:
    """PyTorch FP32's answer to each of the n held-out questions (normalised)."""
    from vlmforge.fixtures.task import normalise_answer

    theirs = torch_answerer(ref)
    return [normalise_answer(theirs(ex.image, ex.question)) for ex in task_examples(n, ref.params.size)]


def task_examples(n: int, size) -> list:
    """The n held-out examples at the set's size: drawn square at that side, or for a height x width set drawn
    square at the longer side and stretched to height x width (how the set fits any other image), so the
    PyTorch and ONNX sides answer about the very same pixels."""
    import dataclasses

    from PIL import Image

    from vlmforge.host.sizes import size_hw
    from vlmforge.fixtures.task import heldout_examples

    h, w = size_hw(size)
    if h == w:
        return heldout_examples(n, h)
    return [dataclasses.replace(ex, image=ex.image.resize((w, h), Image.Resampling.BICUBIC))
            for ex in heldout_examples(n, max(h, w))]


def check_task(engine: Engine, ref: Reference, n: int, want: list[str], tol: dict) -> list[CheckResult]:
    from vlmforge.fixtures.task import normalise_answer

    examples = task_examples(n, ref.params.size)
    ours = onnx_answerer(engine, ref)
    right_o = right_t = same = 0
    for ex, b in zip(examples, want, strict=True):
        a = normalise_answer(ours(ex.image, ex.question))
        right_o += a == ex.answer
        right_t += b == ex.answer
        same += a == b
    acc_o, acc_t = right_o / n, right_t / n
    values = {"accuracy_drop": acc_t - acc_o, "answer_agreement": same / n}
    log.info("task: ONNX %.1f%%, PyTorch FP32 %.1f%% on %d held-out questions", 100 * acc_o, 100 * acc_t, n)
    name = f"held-out accuracy: ONNX {acc_o:.1%} vs PyTorch FP32 {acc_t:.1%} (n={n})"
    return gate("task", name, values, tol)
