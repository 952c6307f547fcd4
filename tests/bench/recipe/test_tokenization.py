"""The appliance's tokenization against XTuner's own, record by record.

The reference is XTuner's code itself: its ``llava_map_fn``, ``template_map_fn`` and
``encode_fn`` with its two filters on every record of a 558,128-record JSON (in worker
processes, as XTuner's 32-process map does), and XTuner's whole ``LLaVADataset`` (its
``datasets`` passes, the Arrow round trip) on the format's corner cases.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import pytest

from bench.core.layout import Layout
from bench.recipe.tokenization import INTERNLM2_CHAT, RECIPE_MAX_LENGTH, as_table, batch_encoder, special_ids
from entrypoint.preflight.tokenized_cache import tokenize_in_processes

LLAVA_PRETRAIN_RECORDS = 558_128
PROMPTS = (
    "Describe the image concisely.\n<image>",
    "<image>\nWrite a short caption for this picture.",
    "Render a clear and concise summary of the photo. <image>",
    "What is <image> in this picture?",
    "<image>",
    "  \n<image>\n  Give a caption.  ",
    "Share a concise interpretation of the image provided.\n<image>",
)
# LLaVA-Pretrain's captions are BLIP's short English sentences, about 12 words.
CAPTION_WORDS = tuple(
    "a the of in on with and red blue green square circle triangle background dog cat man woman "
    "photo picture image close up view white black old new small large people street city two".split()
)
UNICODE = ("café crème", "日本語の説明", "🎉🚀 party", "e\u0301 combining", "שלום", "zero\u200bwidth", "line\u2028sep")
# Text the template or the tokenizer could mistake for its own.
LOOKALIKES = ("{input}", "{round} {0}", "<|im_end|>", "<s> </s>", "<image>", "tab\tand  spaces ", "\n\n")


def _caption(rng: random.Random, words: list[str]) -> str:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 24)))
    if rng.random() < 0.05:
        text += " " + rng.choice(UNICODE + LOOKALIKES)
    return text


def _corner_case(rng: random.Random, words: list[str], index: int) -> list[dict]:
    """Turns of the rare shapes: several turns, leading gpt, trailing human, no answer,
    captions past max_length, a prompt so long that truncation leaves no label."""
    human, gpt = (lambda text: {"from": "human", "value": text}), (lambda text: {"from": "gpt", "value": text})
    long_text = " ".join(rng.choice(words) for _ in range(3000))
    shapes = [
        [human(rng.choice(PROMPTS)), gpt(_caption(rng, words)), human("And the colour?"), gpt(_caption(rng, words))],
        [gpt("a greeting first"), human(rng.choice(PROMPTS)), gpt(_caption(rng, words))],
        [human(rng.choice(PROMPTS)), gpt(_caption(rng, words)), human("a question never answered")],
        [human("first part "), human(rng.choice(PROMPTS)), gpt(_caption(rng, words))],
        [human(rng.choice(PROMPTS))],
        [human(rng.choice(PROMPTS)), gpt(long_text)],
        [human(long_text + " <image>"), gpt(_caption(rng, words))],
        [human(rng.choice(PROMPTS)), gpt("")],
        [human(rng.choice(PROMPTS)), gpt("  spaces and a newline\n")],
    ]
    return shapes[index % len(shapes)]


def synthetic_records(count: int, seed: int = 0) -> list[dict]:
    """LLaVA-Pretrain's record format: one human turn with <image> and one caption,
    with every 997th record one of the corner cases."""
    rng = random.Random(seed)
    words = [*CAPTION_WORDS, *("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(50))]
    records = []
    for index in range(count):
        turns = (
            _corner_case(rng, words, index // 997)
            if index % 997 == 1
            else [{"from": "human", "value": rng.choice(PROMPTS)}, {"from": "gpt", "value": _caption(rng, words)}]
        )
        records.append({"id": f"{index:09d}", "image": f"{index % 1000:05d}/{index:09d}.jpg", "conversations": turns})
    return records


def _tokenizer(synthetic_layout: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(Layout.at(synthetic_layout).llm_dir), trust_remote_code=True, padding_side="right"
    )


# What the worker processes inherit (fork): the records, our result and the tokenizer.
_SHARED: dict = {}


def _xtuner_mismatches(span: tuple[int, int]) -> tuple[list[int], int]:
    """In a worker: XTuner's passes over records[start:stop] (llava_map_fn, the template,
    the empty-conversation filter, encode_fn, the no-label filter); the indices where
    ours differs, and how many records XTuner kept."""
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import encode_fn
    from xtuner.utils import PROMPT_TEMPLATE

    records, ours, row_of, tokenizer = (_SHARED[k] for k in ("records", "ours", "row_of", "tokenizer"))
    template_map_fn = template_map_fn_factory(PROMPT_TEMPLATE.internlm2_chat)
    mismatches, kept = [], 0
    for index in range(*span):
        example = {**records[index], "conversations": [dict(turn) for turn in records[index]["conversations"]]}
        example.update(llava_map_fn(example))
        example.update(template_map_fn(example))
        tokens = None
        if example["conversation"]:
            tokens = encode_fn(example, tokenizer, RECIPE_MAX_LENGTH, with_image_token=True)
            if not any(label >= 0 for label in tokens["labels"]):
                tokens = None
        row = row_of[index]
        if tokens is None:
            if row >= 0:
                mismatches.append(index)
            continue
        kept += 1
        start, stop = ours.offsets[row], ours.offsets[row + 1]
        if (
            row < 0
            or ours.input_ids[start:stop].tolist() != tokens["input_ids"]
            or ours.labels[start:stop].tolist() != tokens["labels"]
        ):
            mismatches.append(index)
    return mismatches, kept


def test_every_record_of_a_558128_record_json_is_tokenized_as_xtuner_does(synthetic_layout, monkeypatch):
    records = synthetic_records(LLAVA_PRETRAIN_RECORDS)
    tokenizer = _tokenizer(synthetic_layout)
    ours = tokenize_in_processes(records, tokenizer, os.cpu_count())  # the build's own path, spans joined
    row_of = np.full(len(records), -1, dtype=np.int64)
    row_of[ours.kept] = np.arange(len(ours.kept))
    _SHARED.update(records=records, ours=ours, row_of=row_of, tokenizer=tokenizer)
    step = 20_000
    spans = [(start, min(start + step, len(records))) for start in range(0, len(records), step)]
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the workers fork after the batch used Rust's threads
    try:
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            answers = pool.map(_xtuner_mismatches, spans)
    finally:
        _SHARED.clear()
    mismatches = [index for found, _ in answers for index in found]
    assert mismatches == [], f"{len(mismatches)} records differ from XTuner's, first {mismatches[:5]}"
    assert sum(kept for _, kept in answers) == len(ours.kept)
    # the corner cases were there: records dropped, records truncated, several image-less turns
    assert len(records) - len(ours.kept) >= 2 * (LLAVA_PRETRAIN_RECORDS // 997 // 9)
    assert (np.diff(ours.offsets) == RECIPE_MAX_LENGTH).sum() >= LLAVA_PRETRAIN_RECORDS // 997 // 9


def test_the_corner_cases_match_xtuners_own_dataset_column_by_column(synthetic_layout, tmp_path):
    """XTuner's dataset processing itself (LLaVADataset's reading of the JSON, then
    process_hf_dataset's datasets passes and Arrow round trip, in one process) on each
    corner case, every prompt and the look-alike texts, against the table the cache saves."""
    from datasets import Dataset, DatasetDict
    from xtuner.dataset.huggingface import process_hf_dataset
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE

    rng = random.Random(1)
    words = list(CAPTION_WORDS)
    turns = [_corner_case(rng, words, index) for index in range(9)]
    turns += [[{"from": "human", "value": p}, {"from": "gpt", "value": _caption(rng, words)}] for p in PROMPTS]
    turns += [[{"from": "human", "value": PROMPTS[0]}, {"from": "gpt", "value": text}] for text in UNICODE + LOOKALIKES]
    records = [{"id": f"{i:09d}", "image": f"{i:09d}.jpg", "conversations": t} for i, t in enumerate(turns)]
    records[3]["id"] = 3  # XTuner turns int ids into strings
    del records[4]["image"]  # a text-only record
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    tokenizer = _tokenizer(synthetic_layout)
    read = json.loads(path.read_text())  # as LLaVADataset reads it
    for record in read:
        record["id"] = str(record["id"]) if isinstance(record["id"], int) else record["id"]
    xtuner = process_hf_dataset(  # with LLaVADataset's arguments, but one process instead of 32
        dataset=DatasetDict({"train": Dataset.from_list(read)}),
        tokenizer=tokenizer,
        max_length=RECIPE_MAX_LENGTH,
        dataset_map_fn=llava_map_fn,
        template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
        split="train",
        max_dataset_length=None,
        remove_unused_columns=False,
        pack_to_max_length=False,
        with_image_token=True,
        map_num_proc=1,
    )
    ours = as_table(tokenize_in_processes(json.loads(path.read_text()), tokenizer, 1), json.loads(path.read_text()))
    assert len(xtuner) == ours.num_rows < len(records)
    for column in ("id", "image", "input_ids", "labels", "length"):
        assert ours.column(column).to_pylist() == xtuner[column], column


def test_the_recipes_template_is_xtuners():
    from xtuner.utils import PROMPT_TEMPLATE

    xtuner = PROMPT_TEMPLATE.internlm2_chat
    assert (INTERNLM2_CHAT.instruction, INTERNLM2_CHAT.suffix, INTERNLM2_CHAT.sep) == (
        xtuner.INSTRUCTION,
        xtuner.SUFFIX,
        xtuner.SEP,
    )
    assert INTERNLM2_CHAT.suffix_as_eos is xtuner.SUFFIX_AS_EOS


def test_the_batch_path_gives_way_to_encode_where_the_wrapper_would_differ(synthetic_layout):
    """A backend with truncation set (the wrapper turns it off for encode) is encoded one
    text at a time, and a backend that disagrees with encode on the first texts too."""
    tokenizer = _tokenizer(synthetic_layout)
    texts = [_caption(random.Random(2), ["red", "square", "blue"]) * 20 for _ in range(100)]
    expected = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    assert batch_encoder(tokenizer)(texts) == expected
    tokenizer.backend_tokenizer.enable_truncation(8)
    assert batch_encoder(tokenizer)(texts) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert tokenizer.encode(texts[0], add_special_tokens=False) == expected[0]  # the wrapper turned it off again


@pytest.mark.parametrize("name", ["Qwen2TokenizerFast", "ChatGLMTokenizer"])
def test_tokenizers_xtuner_special_cases_are_refused(name):
    """XTuner gives these another BOS; the appliance's build refuses them (and the
    trainer then tokenizes with XTuner's code)."""
    tokenizer = type(name, (), {"bos_token_id": 1, "eos_token_id": 2})()
    with pytest.raises(ValueError, match="special-cases"):
        special_ids(tokenizer)


def test_a_turn_from_anyone_else_is_refused_as_xtuner_refuses_it():
    from bench.recipe.tokenization import record_turns

    with pytest.raises(ValueError, match="'system'"):
        record_turns({"id": "x", "conversations": [{"from": "system", "value": "hi"}]})
