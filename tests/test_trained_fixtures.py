"""The trained tiny fixtures and their synthetic VQA task. Fast: no training here (that is
`make train-fixtures`), only the shipped weights, the folders written from them and a short evaluation."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from vlmforge.core.errors import CheckpointError, InputError
from vlmforge.fixtures import task
from vlmforge.fixtures import tokens as T
from vlmforge.fixtures.checkpoint import file_digests
from vlmforge.fixtures.train import conversation_ids, make_batch
from vlmforge.fixtures.trained import (
    TRAINED,
    TRAINED_DIR,
    PromptEncoder,
    evaluate_detailed,
    image_processor_config,
    load_trained_model,
    read_sums,
    torch_answerer,
    verified_weights,
    weights_path,
    write_trained_fixture,
)

FAMILIES = sorted(TRAINED)

# Held-out accuracy measured with `python -m vlmforge.fixtures.train` (PyTorch FP32, 200 questions), and
# the floor this test holds the first 40 of those questions to (measured minus a margin for the smaller
# sample and for float differences between attention implementations).
MEASURED_ACCURACY = {"qwen2_5_vl": 0.91, "qwen3_vl": 0.86}
ACCURACY_FLOOR_40 = {key: value - 0.12 for key, value in MEASURED_ACCURACY.items()}


# ---------------------------------------------------------------- task


def _fingerprint(ex: task.Example) -> str:
    return hashlib.sha256(ex.image.tobytes() + ex.question.encode() + ex.answer.encode()).hexdigest()


def test_task_examples_are_deterministic():
    a = task.generate_examples(task.HELDOUT_SEEDS.start, 12, 112)
    b = task.generate_examples(task.HELDOUT_SEEDS.start, 12, 112)
    assert [_fingerprint(x) for x in a] == [_fingerprint(x) for x in b]
    assert len({_fingerprint(x) for x in a}) == 12  # and different seeds give different examples


def test_task_splits_are_disjoint():
    assert task.TRAIN_SEEDS.stop <= task.HELDOUT_SEEDS.start
    heldout = {_fingerprint(x) for x in task.heldout_examples(200, 112)}
    train = {_fingerprint(x) for x in task.generate_examples(task.TRAIN_SEEDS.start, 300, 112)}
    assert heldout.isdisjoint(train)
    with pytest.raises(InputError, match="straddle"):
        task.generate_examples(task.HELDOUT_SEEDS.start - 2, 4, 112)


def test_task_answers_are_short_and_cover_every_kind():
    examples = task.generate_examples(0, 300, 128)
    assert {ex.kind for ex in examples} == set(task.KINDS)
    assert {ex.answer for ex in examples} <= set(task.answer_vocabulary())
    assert len({ex.answer for ex in examples}) >= 12
    tok = PromptEncoder("qwen3_vl").tokenizer
    assert max(len(tok.encode(a)) for a in task.answer_vocabulary()) <= 3
    assert examples[0].image.size == (128, 128) and examples[0].image.mode == "RGB"


def test_conversation_asks_every_distinct_question_at_most_once():
    for seed in range(40):
        conv = task.make_conversation(seed, 112, 99)
        questions = [q for q, _, _ in conv.turns]
        assert len(questions) == len(set(questions))
        colour_questions = sum(kind == "colour" for _, _, kind in conv.turns)
        assert len(questions) == 1 + 2 * colour_questions  # every question of the picture, once
        assert 1 <= colour_questions <= 4


def test_training_labels_cover_only_the_answer_and_im_end():
    enc = PromptEncoder("qwen2_5_vl")
    examples = task.generate_examples(0, 3, 112)
    batch = make_batch(examples, enc)
    for row, ex in zip(range(3), examples):
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert kept == enc.tokenizer.encode(ex.answer) + [T.EOS_TOKEN_ID]
    assert int((batch["input_ids"] == T.IMAGE_TOKEN_ID).sum(dim=1)[0]) == enc.image_tokens == 16
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == T.IMAGE_TOKEN_ID).long())


def test_training_conversation_is_what_the_chat_template_renders():
    from vlmforge.host.prompt import expand_image_tokens

    enc = PromptEncoder("qwen3_vl")
    seed = next(s for s in range(20) if len(task.make_conversation(s, 128, 4).turns) == 4)
    conv = task.make_conversation(seed, 128, 4)
    first = task.make_example(seed, 128)
    assert conv.turns[0] == (first.question, first.answer, first.kind)
    assert len({q for q, _, _ in conv.turns}) == 4
    messages = []
    for i, (question, answer, _kind) in enumerate(conv.turns):
        image = [{"type": "image"}] if i == 0 else []
        messages += [{"role": "user", "content": [*image, {"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    rendered = enc.tokenizer.encode(enc.tokenizer.apply_chat_template(messages, tokenize=False))
    rendered = expand_image_tokens(rendered, [enc.image_tokens], T.IMAGE_TOKEN_ID)
    ids, targets = conversation_ids(conv, enc)
    assert ids == rendered[: len(ids)] and enc.tokenizer.decode(rendered[len(ids):]) == "\n"
    assert [t for t in targets if t != -100] == [t for _, a, _ in conv.turns for t in enc.answer_ids(a)]


# ---------------------------------------------------------------- shipped weights


def test_shipped_weights_match_sha256sums_and_are_small():
    sums = read_sums()
    assert sorted(sums) == sorted(weights_path(key).name for key in FAMILIES)
    for key in FAMILIES:
        path = weights_path(key)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[path.name]
        assert path.stat().st_size < 5 * 1024 * 1024
        assert verified_weights(key) == path


def test_damaged_weights_raise_checkpoint_error_naming_the_fix(tmp_path):
    root = tmp_path / "trained"
    shutil.copytree(TRAINED_DIR, root)
    path = weights_path("qwen2_5_vl", root)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="make train-fixtures") as err:
        verified_weights("qwen2_5_vl", root)
    assert path.name in str(err.value)


# ---------------------------------------------------------------- written folders


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return {key: write_trained_fixture(key, root / key) for key in FAMILIES}


@pytest.mark.parametrize("key", FAMILIES)
def test_written_trained_fixture_is_byte_deterministic(key, written, tmp_path):
    again = write_trained_fixture(key, tmp_path / key)
    assert file_digests(again) == file_digests(written[key])


@pytest.mark.parametrize("key", FAMILIES)
def test_written_trained_fixture_loads_with_hf(key, written):
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    folder = written[key]
    model = getattr(transformers, TRAINED[key].model_class).from_pretrained(folder).eval()
    reference = load_trained_model(key)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|image_pad|>") == T.IMAGE_TOKEN_ID

    size = TRAINED[key].image_size
    processor = Qwen2VLImageProcessor.from_pretrained(folder)
    assert processor.to_dict()["size"] == image_processor_config(key)["size"]
    image = task.heldout_examples(1, size)[0].image
    enc = PromptEncoder(key)
    for picture in (image, image.resize((2 * size, 2 * size))):  # larger square images come back to `size`
        out = processor(images=[picture], return_tensors="np")
        assert out["image_grid_thw"].tolist() == [enc.grid()]
    np.testing.assert_allclose(processor(images=[image], return_tensors="np")["pixel_values"], enc.pixels(image),
                               atol=1e-6)


@pytest.mark.parametrize("key", FAMILIES)
def test_pytorch_answers_held_out_questions(key, written):
    import transformers

    model = getattr(transformers, TRAINED[key].model_class).from_pretrained(written[key]).eval()
    result = evaluate_detailed(torch_answerer(model, key), key, n=40)
    assert result["all"] >= ACCURACY_FLOOR_40[key], result
