"""Text classification from CSV or JSON Lines files, tokenized by any Hugging Face tokenizer.

With ``fast: true`` (default) every split is tokenized once, at ``setup``, into one integer tensor per tokenizer output
(``input_ids``, ``attention_mask``, ...; :class:`TokenRows`), and a batch is gathered with one indexing operation and cut
to its longest sample (:class:`TokenSubset`): the same tensors as tokenizing the batch's texts with ``padding=True``.
``fast: false`` tokenizes each batch in the loader (:meth:`TextClassification.collate_fn`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.base import LabeledSubset, Splits, per_class_subset, split_indices
from datamodules.resumable import eval_loader, eval_order, train_loader
from datamodules.tensor import Gathered
from zoo.batch import Batch, collate


def read_records(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """``(text, label)`` rows of a ``.csv`` or ``.jsonl`` file."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        raise ValueError(f"{path}: expected a .csv or .jsonl file")
    if rows and (text_column not in rows[0] or label_column not in rows[0]):
        raise ValueError(f"{path}: columns {sorted(rows[0])} lack text_column={text_column!r} or label_column={label_column!r}")
    return [(str(r[text_column]), str(r[label_column])) for r in rows]


class TextRows(Dataset):
    """Texts and labels: ``Batch(inputs=text, targets=label)``."""

    def __init__(self, texts: list[str], targets: list[int]):
        self.texts, self.targets = texts, targets

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> Batch:
        return Batch(inputs=self.texts[i], targets=self.targets[i])


class TokenRows(TextRows):
    """Texts and labels with their tokens: ``tokens`` maps each tokenizer output to one ``int32`` tensor ``[N, L]`` (padded
    on ``padding_side`` to the longest text, at most ``max_length``), ``targets_tensor`` the labels."""

    def __init__(self, texts: list[str], targets: list[int], tokens: dict[str, torch.Tensor], padding_side: str = "right"):
        super().__init__(texts, targets)
        self.tokens, self.padding_side = tokens, padding_side
        self.targets_tensor = torch.tensor(targets, dtype=torch.long)

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tokens of ``rows`` as ``int64`` tensors padded to the longest of them (as a tokenizer pads a batch)."""
        out = {k: v[rows] for k, v in self.tokens.items()}
        mask = out.get("attention_mask")
        if mask is not None and len(rows):
            width = int(mask.sum(1).max())
            cut = slice(None, width) if self.padding_side == "right" else slice(mask.shape[1] - width, None)
            out = {k: v[:, cut] for k, v in out.items()}
        return {k: v.long() for k, v in out.items()}


class TokenSubset(LabeledSubset):
    """A split of :class:`TokenRows`: a batch of items is gathered at once (one indexing of each token tensor), with
    ``targets`` and (``with_index``) ``index``; item by item it yields the texts, as :class:`LabeledSubset`."""

    def gatherable(self) -> bool:
        return isinstance(self.dataset, TokenRows) and self.transform is None

    def load_batch(self, positions: torch.Tensor, epoch: int | None = None, skip: bool = False, with_raw: bool = True) -> Batch:
        rows = self.rows()[positions]
        return Batch(inputs=self.dataset.gather(rows), targets=self.dataset.targets_tensor[rows])


class TextClassification(Splits, LightningDataModule):
    """Text classification: batches are ``zoo.batch.Batch(inputs=tokenizer outputs dict, targets=labels)``
    (and ``index`` with ``with_index``), padded per batch by :meth:`collate_fn`.

    Args:
        data_dir: folder holding the files.
        train_file: ``.csv`` or ``.jsonl`` with ``text_column`` and ``label_column``.
        val_file: optional; without it ``val_fraction`` of train is held out (seeded).
        test_file: optional; without it val is used for testing.
        tokenizer: a Hugging Face tokenizer name or local path (``pypi/all-MiniLM-L6-v2`` works offline).
        labels: class names in order (default: sorted labels of the train file).
        with_index: training and validation batches carry ``index`` (the sample's position in its split).
        fast: tokenize every split once and gather batches from the token tensors (see the module docstring); ``false``
            tokenizes each batch in the loader. The same batches either way.
    """

    def __init__(
        self,
        data_dir: str = "data",
        train_file: str = "train.csv",
        val_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: str = "pypi/all-MiniLM-L6-v2",
        max_length: int = 128,
        labels: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        samples_per_class: int | None = None,
        with_index: bool = False,
        fast: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.with_index = with_index
        self.fast = fast
        self.files = {s: Path(data_dir) / f for s, f in (("train", train_file), ("val", val_file), ("test", test_file)) if f}
        for split, path in self.files.items():
            if not path.is_file():
                raise FileNotFoundError(f"{split}_file not found: {path} (data_dir={data_dir!r}). Write a .csv or .jsonl with columns {text_column!r} and {label_column!r}.")
        self.records = {s: read_records(p, text_column, label_column) for s, p in self.files.items()}
        self.labels = list(labels) if labels else sorted({lab for _, lab in self.records["train"]})
        self.num_classes = len(self.labels)
        self.deterministic_train_transform = True
        self.tokenizer = None
        self.train_set = self.val_set = self.test_set = None

    def _rows(self, split: str) -> TextRows:
        index = {lab: i for i, lab in enumerate(self.labels)}
        unknown = sorted({lab for _, lab in self.records[split] if lab not in index})
        if unknown:
            raise ValueError(f"{self.files[split]}: labels {unknown[:5]} are not in labels={self.labels}")
        texts, targets = [t for t, _ in self.records[split]], [index[lab] for _, lab in self.records[split]]
        if not self.fast:
            return TextRows(texts, targets)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.hparams.max_length, return_tensors="pt")
        return TokenRows(texts, targets, {k: v.to(torch.int32) for k, v in enc.items()}, self.tokenizer.padding_side)

    def _subset(self, rows: TextRows, indices: Any, with_index: bool) -> LabeledSubset:
        return (TokenSubset if self.fast else LabeledSubset)(rows, indices, rows.targets, with_index=with_index)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from transformers import AutoTokenizer

        from zoo.backbones import hf_path

        self.tokenizer = AutoTokenizer.from_pretrained(hf_path(self.hparams.tokenizer))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        train = self._rows("train")
        if "val" in self.files:
            train_idx, val, val_idx = list(range(len(train))), self._rows("val"), None
        else:
            train_idx, val_idx = split_indices(train.targets, self.hparams.val_fraction, self.hparams.seed)
            val = train
        if self.hparams.samples_per_class:
            train_idx = per_class_subset(train_idx, train.targets, self.hparams.samples_per_class, self.hparams.seed)
        self.train_set = self._subset(train, train_idx, self.with_index)
        self.val_set = self._eval_subset(val, val_idx if val_idx is not None else range(len(val)), self.with_index)
        test = self._rows("test") if "test" in self.files else None
        self.test_set = self._eval_subset(test, range(len(test))) if test else self.val_set

    def _eval_subset(self, rows: TextRows, indices: Any, with_index: bool = False) -> LabeledSubset:
        """An evaluation split in a fixed seeded order (files sorted by label would put one class first)."""
        return self._subset(rows, eval_order(indices, self.hparams.seed), with_index)

    def eval_view(self, split: str = "train") -> LabeledSubset:
        """A copy of ``split`` with ``index`` in every sample (texts need no transform), same samples in the same order;
        collate it with :meth:`collate_fn`. The split itself is left as it is."""
        return self.split(split).view(transform=None, with_index=True)

    def collate_fn(self, samples: list[Batch] | Gathered) -> Batch:
        """Tokenize (padding to the longest) into ``Batch(inputs=dict of tokenizer outputs, targets, index)``; a batch
        gathered from the token tensors (``fast``) is already one."""
        if isinstance(samples, Gathered):
            return samples.batch
        enc = self.tokenizer([s.inputs for s in samples], padding=True, truncation=True, max_length=self.hparams.max_length, return_tensors="pt")
        return collate([s.replace(inputs=None) for s in samples]).replace(inputs=dict(enc))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if shuffle:
            return train_loader(dataset, self.batch_size, self.hparams.seed, self.num_workers, collate_fn=self.collate_fn)
        return eval_loader(dataset, self.batch_size, self.num_workers, collate_fn=self.collate_fn)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
