"""The micro-batches a run will train on, known before launch (docs/PERFORMANCE.md,
"The memory model").

GPU memory follows the padded length of a micro-batch, which is its longest sample's:
XTuner's ``default_collate_fn`` pads every sample's text to the longest in the batch, and
``prepare_inputs_labels_for_multimodal`` pads again after the image placeholder became
the image's tokens. Which records meet in a micro-batch is decided by the pinned config's
``DefaultSampler(shuffle=True)``: mmengine seeds it with the run's seed (plus the epoch),
permutes the dataset with ``torch.randperm``, repeats the permutation up to a multiple of
the world size and deals it out to the ranks in turn; each rank's dataloader then cuts its
share into batches of ``per_device_batch`` (the last one of an epoch smaller). This module
repeats that from the tokenized dataset's lengths, for every rank and every micro-iteration
up to ``max_steps``; tests/bench/recipe/test_micro_batches.py holds it against XTuner's real dataloader.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

IMAGE_PLACEHOLDER = -200  # the one token of a sample's text that becomes the image's tokens
IGNORE_LABEL = -100
# Epochs the plan follows at most: a run asked for more steps than that many epochs hold
# has its plan cut there, and says so (each epoch's order is another permutation).
PLANNED_EPOCHS_AT_MOST = 16


@dataclass(frozen=True)
class RecordLengths:
    """What the memory of a micro-batch depends on, for each record the trainer keeps, in
    the dataset's order: its text tokens, whether it has an image, its labelled tokens."""

    ids: list[str]
    text_tokens: np.ndarray  # int64
    images: np.ndarray  # int64: image placeholders in the text
    labelled: np.ndarray  # int64: positions whose next token has a label (the loss's terms)

    @classmethod
    def from_tokenized(cls, folder: Path) -> RecordLengths:
        """Read from the tokenized dataset (bench/recipe/tokenization.py) without decoding a row."""
        from datasets import load_from_disk

        table = load_from_disk(str(folder)).data.table
        ids, labels = table.column("input_ids").combine_chunks(), table.column("labels").combine_chunks()
        starts = ids.offsets.to_numpy()[:-1]
        placeholders = (ids.values.to_numpy() == IMAGE_PLACEHOLDER).astype(np.int64)
        labelled = (labels.values.to_numpy() != IGNORE_LABEL).astype(np.int64)
        first_labelled = labelled[starts] if len(starts) else labelled[:0]
        return cls(
            ids=[str(value) for value in table.column("id").to_pylist()],
            text_tokens=np.diff(ids.offsets.to_numpy()).astype(np.int64),
            images=np.add.reduceat(placeholders, starts) if len(starts) else placeholders[:0],
            labelled=(np.add.reduceat(labelled, starts) - first_labelled) if len(starts) else labelled[:0],
        )


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of one rank: what the GPU's memory of its step follows."""

    micro_iteration: int  # 0-based, over the whole run
    step: int  # the optimizer step it belongs to, 1-based
    rank: int
    samples: int
    text_tokens: int  # padded: its longest sample's text
    positions: int  # padded LLM positions: the longest sample's text, its placeholder replaced by the image's tokens
    labelled: int  # labelled positions over its samples
    records: tuple[str, ...]  # the ids of its samples

    def as_dict(self) -> dict:
        return {**asdict(self), "records": list(self.records)}


@dataclass(frozen=True)
class MicroBatchPlan:
    """Every micro-batch of every rank up to max_steps (or the stated bound where the
    records' lengths are not known): the verdict's ``recipe.micro_batches``."""

    source: str  # "tokenized dataset", or "bound" where the lengths are not known
    detail: str  # where the figures come from, in words
    per_device_batch: int
    world_size: int
    accumulative_counts: int
    # per micro-iteration (rows) and rank (columns): padded text tokens, padded LLM
    # positions, samples, labelled positions
    text_tokens: np.ndarray
    positions: np.ndarray
    samples: np.ndarray
    labelled: np.ndarray
    longest_records: tuple[str, ...] = ()  # the ids of the longest micro-batch's samples
    records: int | None = None  # the records the trainer keeps (after XTuner's filters); None: not known

    @property
    def micro_iterations(self) -> int:
        return len(self.positions)

    @property
    def longest(self) -> MicroBatch:
        """The micro-batch with the most padded positions (the first such)."""
        return self.longest_between(0, self.micro_iterations - 1, self.longest_records)

    def longest_between(self, first: int, last: int, records: tuple[str, ...] = ()) -> MicroBatch | None:
        """The micro-batch with the most positions among micro-iterations ``first`` to
        ``last`` (a failure's window), or None outside the plan."""
        first, last = max(0, first), min(last, self.micro_iterations - 1)
        if first > last:
            return None
        window = self.positions[first : last + 1]
        row, rank = (int(i) for i in np.unravel_index(int(np.argmax(window)), window.shape))
        row += first
        return MicroBatch(
            micro_iteration=row,
            step=row // self.accumulative_counts + 1,
            rank=rank,
            samples=int(self.samples[row, rank]),
            text_tokens=int(self.text_tokens[row, rank]),
            positions=int(self.positions[row, rank]),
            labelled=int(self.labelled[row, rank]),
            records=records,
        )

    def summary(self) -> dict:
        samples = self.samples.sum()
        return {
            "source": self.source,
            "detail": self.detail,
            "per_device_batch": self.per_device_batch,
            "world_size": self.world_size,
            "micro_iterations": self.micro_iterations,
            "text_tokens_per_sample": round(float((self.text_tokens * self.samples).sum() / samples), 3),
            "labelled_tokens_per_sample": round(float(self.labelled.sum() / samples), 3),
            "longest": self.longest.as_dict(),
        }


def records_a_rank(records: int, world_size: int) -> int:
    """mmengine's DefaultSampler(round_up=True) rounds the records up to a multiple of
    the processes."""
    return -(-records // world_size)


def iterations_an_epoch(records: int, per_device_batch: int, world_size: int) -> int:
    """Each rank's dataloader keeps its last, smaller batch."""
    return -(-records_a_rank(records, world_size) // per_device_batch)


def sampler_order(records: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Each rank's dataset indices for one epoch, as mmengine's DefaultSampler(shuffle=True,
    round_up=True) yields them: rank r's are row r."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    permutation = torch.randperm(records, generator=generator).numpy()
    per_rank = records_a_rank(records, world_size)
    dealt = np.resize(permutation, per_rank * world_size)  # np.resize repeats it, as round_up does
    return dealt.reshape(per_rank, world_size).T


def plan(
    lengths: RecordLengths,
    per_device_batch: int,
    world_size: int,
    accumulative_counts: int,
    max_steps: int,
    seed: int,
    image_tokens: int,
) -> MicroBatchPlan:
    """Every rank's micro-batches up to ``max_steps`` from the records' lengths."""
    records = len(lengths.text_tokens)
    positions_per_record = lengths.text_tokens + lengths.images * (image_tokens - 1)
    per_rank = records_a_rank(records, world_size)
    batches_per_epoch = iterations_an_epoch(records, per_device_batch, world_size)
    wanted = max_steps * accumulative_counts
    epochs = min(-(-wanted // batches_per_epoch), PLANNED_EPOCHS_AT_MOST)
    starts = np.arange(0, per_rank, per_device_batch)
    sizes = np.diff(np.append(starts, per_rank))
    tables: dict[str, list] = {"text": [], "positions": [], "labelled": [], "orders": []}
    for epoch in range(epochs):
        order = sampler_order(records, world_size, seed, epoch)  # (ranks, per_rank)
        tables["text"].append(np.maximum.reduceat(lengths.text_tokens[order], starts, axis=1).T)
        tables["positions"].append(np.maximum.reduceat(positions_per_record[order], starts, axis=1).T)
        tables["labelled"].append(np.add.reduceat(lengths.labelled[order], starts, axis=1).T)
        tables["orders"].append(order)
    planned = min(wanted, epochs * batches_per_epoch)
    cut = "" if planned == wanted else f"; cut at {planned} of {wanted} micro-iterations ({epochs} epochs)"
    result = MicroBatchPlan(
        source="tokenized dataset",
        detail=f"{records} records' lengths; mmengine's DefaultSampler with seed {seed}{cut}",
        per_device_batch=per_device_batch,
        world_size=world_size,
        accumulative_counts=accumulative_counts,
        text_tokens=np.concatenate(tables["text"])[:planned],
        positions=np.concatenate(tables["positions"])[:planned],
        samples=np.tile(sizes, (epochs, world_size, 1)).transpose(0, 2, 1).reshape(-1, world_size)[:planned],
        labelled=np.concatenate(tables["labelled"])[:planned],
        records=records,
    )
    longest = result.longest
    epoch, batch = divmod(longest.micro_iteration, batches_per_epoch)
    start = batch * per_device_batch
    members = tables["orders"][epoch][longest.rank, start : start + per_device_batch]
    return replace(result, longest_records=tuple(lengths.ids[i] for i in members.tolist()))


def bounded(why: str, text_tokens: int, per_device_batch: int, world_size: int, image_tokens: int) -> MicroBatchPlan:
    """The plan where the records' lengths are not known: every micro-batch taken at
    ``text_tokens`` (the truncation length: no record is longer), every position labelled."""
    full = np.full((1, world_size), 1)
    return MicroBatchPlan(
        source="bound",
        detail=f"{why}: every micro-batch taken at the truncation length, {text_tokens} text tokens a sample",
        per_device_batch=per_device_batch,
        world_size=world_size,
        accumulative_counts=1,
        text_tokens=full * text_tokens,
        positions=full * (text_tokens - 1 + image_tokens),
        samples=full * per_device_batch,
        labelled=full * per_device_batch * text_tokens,
    )
