"""Token sequences without downloads: a character vocabulary, text that ships with Python, and
:class:`PaddedBatches`, dict batches padded to each batch's longest sequence in a (seed, epoch) order.

The language examples (a BERT-like classifier, a small causal LM) train on the documentation of
Python's own standard library (:func:`stdlib_docs`): it is on every machine featkd runs on. Its text
changes between Python versions, so a result names the Python it ran under.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import random
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from featkd.batches import BatchFormat

__all__ = ["CharVocabulary", "IGNORE_INDEX", "PaddedBatches", "SNIPPET_SOURCES", "TEXT_DATASETS", "TextDataset",
           "TextInfo", "is_text_dataset", "load_text_dataset", "snippets", "stdlib_docs"]

IGNORE_INDEX = -100  # a position without a label, as Hugging Face's losses read it
# four well-documented modules: the classes of stdlib_snippets and of example (a)
SNIPPET_SOURCES = ("argparse", "logging", "statistics", "difflib")


def stdlib_docs(module: str) -> str:
    """The docstrings of ``module`` and of its public classes and functions, joined, whitespace collapsed."""
    mod = importlib.import_module(module)
    parts = [inspect.getdoc(mod) or ""]
    for name, value in sorted(vars(mod).items()):
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)) \
                and getattr(value, "__module__", None) == module:
            parts.append(inspect.getdoc(value) or "")
    return " ".join(" ".join(parts).split())


class CharVocabulary:
    """Characters as token ids: 0 is padding, 1 an unknown character, then the characters of ``text``."""

    PAD, UNKNOWN = 0, 1

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.ids = {c: i + 2 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, self.UNKNOWN) for c in text]


def snippets(texts: Sequence[str], count: int, lengths: tuple[int, int], seed: int) -> tuple[list[str], list[int]]:
    """``count`` windows of ``texts`` with lengths drawn in ``lengths`` (inclusive), each labelled with the index
    of the text it comes from, the texts drawn equally often; the same for the same ``seed``."""
    rng = random.Random(seed)
    windows, labels = [], []
    for i in range(count):
        label = i % len(texts)
        length = rng.randint(*lengths)
        start = rng.randrange(len(texts[label]) - length)
        windows.append(texts[label][start:start + length])
        labels.append(label)
    order = list(range(count))
    rng.shuffle(order)
    return [windows[i] for i in order], [labels[i] for i in order]


class TextInfo(NamedTuple):
    """What a model and a loader need to know about a text dataset (the counterpart of an image
    :class:`featkd.data.DatasetInfo`): its classes, its vocabulary and its longest sequence. ``in_channels``
    is 1 so that code that builds any model from a dataset's info builds these too."""

    name: str
    num_classes: int
    vocab_size: int
    max_length: int
    in_channels: int = 1


@dataclass(frozen=True)
class TextDataset:
    """Token sequences with one class each, and their :class:`TextInfo`."""

    sequences: list[list[int]]
    labels: torch.Tensor
    info: TextInfo

    def __len__(self) -> int:
        return len(self.sequences)


TEXT_DATASETS = ("stdlib_snippets",)


def is_text_dataset(name: str) -> bool:
    return name.strip().lower().replace("-", "_") in TEXT_DATASETS


def load_text_dataset(name: str, split: str = "train", *, limit: int | None = None, size: int = 4000,
                      test_size: int = 800, sources: Sequence[str] = SNIPPET_SOURCES,
                      lengths: Sequence[int] = (32, 96), seed: int = 0) -> TextDataset:
    """A split of a text dataset. ``stdlib_snippets``: which module of ``sources`` a snippet of ``lengths``
    characters of its documentation comes from; the training split draws ``size`` snippets (with ``seed``)
    from the first 75% of each module's documentation, the test split ``test_size`` from the last 25%, so no
    test character is seen in training; ``limit`` keeps the first ``limit`` of them (drawn in a shuffled
    order, the classes about equally often)."""
    key = name.strip().lower().replace("-", "_")
    if key not in TEXT_DATASETS:
        close = difflib.get_close_matches(key, TEXT_DATASETS, n=2)
        raise ValueError(f"unknown text dataset {name!r}." + (f" Did you mean: {', '.join(close)}?" if close else "")
                         + f" Known: {', '.join(TEXT_DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    low, high = (int(v) for v in lengths)
    if not 1 <= low <= high:
        raise ValueError(f"dataset {name!r}: lengths must be [shortest, longest] with 1 <= shortest <= longest, "
                         f"got {list(lengths)}")
    docs = [stdlib_docs(m) for m in sources]
    cut = [int(0.75 * len(d)) for d in docs]
    parts = [d[:c] for d, c in zip(docs, cut)] if split == "train" else [d[c:] for d, c in zip(docs, cut)]
    texts, labels = snippets(parts, size if split == "train" else test_size, (low, high),
                             seed if split == "train" else 10_000)
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    vocab = CharVocabulary("".join(docs))
    info = TextInfo(key, len(sources), len(vocab), high)
    return TextDataset([vocab.encode(t) for t in texts], torch.tensor(labels), info)


class PaddedBatches:
    """Dict batches of token sequences, each padded to its batch's longest sequence.

    A batch holds ``input_ids`` and ``attention_mask`` (B, L) and ``labels``: per sequence (B,) when
    ``labels`` is given, else per token for a language model: the ids, :data:`IGNORE_INDEX` on padding (what a
    Hugging Face causal LM takes to return its own loss, shifting them itself), and ``next_tokens``, the ids
    shifted by one (position i holds token i + 1; :data:`IGNORE_INDEX` at each sequence's last token and on
    padding), targets that per-token cross-entropy and next-token accuracy read position by position.
    The order of an epoch is a function of (seed, epoch) only (:meth:`set_epoch`), as featkd's image loader
    does, so a resumed run sees the same batches. Read it with
    ``featkd.BatchFormat(inputs=("input_ids", "attention_mask"), targets="labels", mask="attention_mask")``.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], labels: Sequence[int] | None = None, *,
                 batch_size: int, shuffle: bool = True, seed: int = 0, pad_id: int = CharVocabulary.PAD,
                 info: TextInfo | None = None):
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("PaddedBatches needs at least one sequence and no empty one")
        if labels is not None and len(labels) != len(sequences):
            raise ValueError(f"{len(labels)} labels for {len(sequences)} sequences")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sequences = [list(s) for s in sequences]
        self.labels = None if labels is None else torch.tensor(list(labels))
        self.batch_size, self.shuffle, self.seed, self.pad_id = batch_size, shuffle, seed, pad_id
        self.info = info
        self.epoch = 0

    @property
    def batch_format(self) -> BatchFormat:
        """How a model reads these batches: classes per sequence, or next tokens for a language model."""
        targets = "labels" if self.labels is not None else "next_tokens"
        return BatchFormat(inputs=("input_ids", "attention_mask"), targets=targets, mask="attention_mask")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.sequences)))
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        return torch.randperm(len(self.sequences), generator=generator).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            length = max(len(self.sequences[i]) for i in chosen)
            ids = torch.full((len(chosen), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chosen), length), dtype=torch.long)
            for row, i in enumerate(chosen):
                ids[row, :len(self.sequences[i])] = torch.tensor(self.sequences[i])
                mask[row, :len(self.sequences[i])] = 1
            if self.labels is not None:
                yield {"input_ids": ids, "attention_mask": mask, "labels": self.labels[chosen]}
                continue
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            following = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels, "next_tokens": following}
