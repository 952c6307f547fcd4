"""XTuner's tokenization of LLaVA records, computed in one batch.

XTuner's ``LLaVADataset`` turns each record into tokens with ``llava_map_fn``, the
chat template's ``template_map_fn``, ``encode_fn`` and two filters, run as five
``datasets`` passes of 32 processes (490 s for LLaVA-Pretrain's 558,128 records on a
16-core machine, 221 s on 2 cores; docs/PERFORMANCE.md). The tokens of a record depend
only on the strings ``encode_fn`` encodes, so this module builds those strings the
same way, encodes each distinct prompt once and every answer in one batch call of the
fast tokenizer's backend (all cores, no Python per token), and lays the ids and labels
out as ``encode_fn`` does. tests/bench/recipe/test_tokenization.py holds the result equal to XTuner's
own on every record of a 558,128-record JSON and on the format's corner cases.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from itertools import chain
from pathlib import Path

import numpy as np

IMAGE_TOKEN = "<image>"  # XTuner's DEFAULT_IMAGE_TOKEN
IMAGE_TOKEN_INDEX = -200  # where encode_fn puts the image's features
IGNORE_INDEX = -100  # a label without loss
# Tokenizer classes whose BOS and EOS XTuner's get_bos_eos_token_ids special-cases.
XTUNER_SPECIAL_BOS = ("QWenTokenizer", "QWen2Tokenizer", "Qwen2TokenizerFast", "ChatGLMTokenizer")
# Distinct strings checked against the tokenizer's own encode() before the batch path is trusted.
SPOT_CHECKED = 64


@dataclass(frozen=True)
class ChatTemplate:
    """The fields of an XTuner prompt template that tokenization reads (LLaVA records
    carry no system prompt, so SYSTEM never applies)."""

    instruction: str
    suffix: str
    suffix_as_eos: bool
    sep: str


# XTuner's PROMPT_TEMPLATE.internlm2_chat, the pinned recipe's template.
INTERNLM2_CHAT = ChatTemplate(
    instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>",
    suffix_as_eos=True,
    sep="\n",
)


# The recipe's max_length: 2048 positions minus CLIP ViT-L/14-336's 576 image tokens.
RECIPE_MAX_LENGTH = 2048 - (336 // 14) ** 2
# What the tokens depend on besides the JSON, the tokenizer files, the template and
# max_length: the libraries that compute them (XTuner's, when the trainer falls back to it).
TOKENIZATION_PACKAGES = ("xtuner", "transformers", "tokenizers", "datasets")


def cache_name(dataset_sha256: str, llm_dir: Path) -> str:
    """The tokenized dataset's folder name: a hash of everything the tokens depend on,
    so a changed input never meets a stale cache."""
    tokenizer_files = sorted(
        p
        for p in llm_dir.iterdir()
        if p.is_file() and (p.name.startswith("tokeniz") or p.name in ("special_tokens_map.json", "added_tokens.json"))
    )
    identity = {
        "dataset_sha256": dataset_sha256,
        "tokenizer": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tokenizer_files},
        "template": asdict(INTERNLM2_CHAT),
        "max_length": RECIPE_MAX_LENGTH,
        "packages": {name: metadata.version(name) for name in TOKENIZATION_PACKAGES},
    }
    return "tokenized-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def record_turns(record: dict) -> list[tuple[str, str]]:
    """(input, answer) for each gpt turn, as ``llava_map_fn`` makes them: leading gpt
    turns dropped, human turns concatenated, the ``<image>`` of a human turn moved to its
    front on a line of its own."""
    messages = record["conversations"]
    start = 0
    while start < len(messages) and messages[start]["from"] == "gpt":
        start += 1
    turns, text = [], ""
    for message in messages[start:]:
        value = message["value"]
        if message["from"] == "human":
            if IMAGE_TOKEN in value:
                value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
            text += value
        elif message["from"] == "gpt":
            turns.append((text, value))
            text = ""
        else:
            raise ValueError(f"record {record.get('id')!r}: a turn from {message['from']!r} (XTuner reads human, gpt)")
    return turns


@dataclass(frozen=True)
class Tokenized:
    """The records XTuner keeps, in order: their index in the JSON, and the ids and
    labels of all of them, flat, with ``offsets[i]:offsets[i + 1]`` the i-th's."""

    kept: np.ndarray  # int64
    offsets: np.ndarray  # int64, len(kept) + 1
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """BOS and EOS as lists, as XTuner's get_bos_eos_token_ids gives them."""
    name = type(tokenizer).__name__
    if name in XTUNER_SPECIAL_BOS:
        raise ValueError(f"{name}: XTuner special-cases its BOS; the appliance's tokenization does not")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"{name} has no BOS or EOS token id, which XTuner's encode_fn needs")
    return [bos], [eos]


def batch_encoder(tokenizer) -> Callable[[Sequence[str]], list[list[int]]]:
    """``tokenizer.encode(text, add_special_tokens=False)`` for many texts at once.

    A fast tokenizer's backend encodes the whole batch in Rust on every core; that is
    what ``encode`` calls one text at a time, unless the wrapper would set truncation,
    padding or special-token splitting first, or a subclass changes the call. Those
    cases, and any tokenizer whose backend disagrees with ``encode`` on the first
    texts, are encoded one by one through ``encode`` itself."""

    def one_by_one(texts: Sequence[str]) -> list[list[int]]:
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts]

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is None
        or backend.truncation is not None
        or backend.padding is not None
        or getattr(tokenizer, "split_special_tokens", False)
    ):
        return one_by_one

    def batched(texts: Sequence[str]) -> list[list[int]]:
        ids = [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
        if ids[:SPOT_CHECKED] != one_by_one(texts[:SPOT_CHECKED]):
            return one_by_one(texts)
        return ids

    return batched


def tokenize_records(
    records: list[dict],
    encode: Callable[[Sequence[str]], list[list[int]]],
    bos: list[int],
    eos: list[int],
    max_length: int,
    template: ChatTemplate = INTERNLM2_CHAT,
) -> Tokenized:
    """The ids and labels XTuner's LLaVADataset computes for ``records`` (``encode_fn``
    with the image token, input with output, truncated to ``max_length``), without the
    records it filters out: those with no gpt answer, and those whose labels truncation
    left without a single labelled token."""
    turns = [record_turns(record) for record in records]
    # Each distinct (input, turn number) is templated and split at the image once, and
    # each distinct piece encoded once: LLaVA-Pretrain's 558,128 inputs are a few dozen.
    prompt_pieces: dict[tuple[str, int], list[str]] = {}
    answers: list[str] = []
    for index, record_turn in enumerate(turns):
        for number, (text, answer) in enumerate(record_turn, start=1):
            if (text, number) not in prompt_pieces:
                pieces = template.instruction.format(input=text, round=number).split(IMAGE_TOKEN)
                if len(pieces) > 2:
                    raise ValueError(f"record {records[index].get('id')!r}: a turn with more than one {IMAGE_TOKEN}")
                prompt_pieces[text, number] = pieces
            answers.append(answer + template.suffix)
    distinct = list(dict.fromkeys([*(p for pieces in prompt_pieces.values() for p in pieces), template.sep]))
    encoded = dict(zip(distinct, encode(distinct)))
    prompts = {
        key: encoded[pieces[0]] + ([IMAGE_TOKEN_INDEX, *encoded[pieces[1]]] if len(pieces) == 2 else [])
        for key, pieces in prompt_pieces.items()
    }
    answer_ids = encode(answers) if answers else []
    sep = encoded[template.sep] if template.sep else []
    no_loss_sep = [IGNORE_INDEX] * len(sep)

    kept, kept_ids, kept_labels = [], [], []
    turn = 0
    for index, record_turn in enumerate(turns):
        ids, labels, needs_bos, first_labelled = [], [], True, None
        for number, (text, _) in enumerate(record_turn, start=1):
            head = (bos if needs_bos else []) + prompts[text, number]
            answer = answer_ids[turn]
            turn += 1
            ids += head
            labels += [IGNORE_INDEX] * len(head)
            if first_labelled is None and answer:
                first_labelled = len(ids)
            ids += answer
            labels += answer
            needs_bos = not template.suffix_as_eos
            if needs_bos:
                first_labelled = len(ids) if first_labelled is None else first_labelled
                ids += eos
                labels += eos
            ids += sep
            labels += no_loss_sep
        # XTuner's filters: a record with no answer, or none of whose labels survive truncation
        if first_labelled is not None and first_labelled < max_length:
            kept.append(index)
            kept_ids.append(ids[:max_length])
            kept_labels.append(labels[:max_length])
    lengths = np.fromiter(map(len, kept_ids), dtype=np.int64, count=len(kept_ids))
    total = int(lengths.sum())
    return Tokenized(
        kept=np.asarray(kept, dtype=np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        input_ids=np.fromiter(chain.from_iterable(kept_ids), dtype=np.int32, count=total),
        labels=np.fromiter(chain.from_iterable(kept_labels), dtype=np.int32, count=total),
    )


def as_table(tokenized: Tokenized, records: list[dict]):
    """The kept records as the Arrow table of XTuner's dataset columns that training
    reads: id, image, input_ids, labels and length (ids and labels as int32 lists)."""
    import pyarrow as pa

    if tokenized.offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{tokenized.offsets[-1]} tokens: more than an Arrow list's 32-bit offsets hold")
    offsets = pa.array(tokenized.offsets.astype(np.int32))
    kept = [records[index] for index in tokenized.kept.tolist()]
    return pa.table(
        {
            "id": pa.array([str(record["id"]) for record in kept], type=pa.string()),
            "image": pa.array([record.get("image") for record in kept], type=pa.string()),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(tokenized.input_ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(tokenized.labels)),
            "length": pa.array(np.diff(tokenized.offsets)),
        }
    )


def concatenate(parts: list[tuple[int, Tokenized]]) -> Tokenized:
    """One result from those of consecutive spans of the records, each with the index of
    its span's first record (records tokenize independently, so this is the same result)."""
    shifts = np.cumsum([0, *(part.offsets[-1] for _, part in parts[:-1])])
    return Tokenized(
        kept=np.concatenate([part.kept + start for start, part in parts]),
        offsets=np.concatenate([[0], *(part.offsets[1:] + shift for (_, part), shift in zip(parts, shifts))]),
        input_ids=np.concatenate([part.input_ids for _, part in parts]),
        labels=np.concatenate([part.labels for _, part in parts]),
    )
