"""Tiny stand-in data in the real on-disk formats, so every config can run without downloads."""

from __future__ import annotations

import csv
import shlex
import pickle
from pathlib import Path

import numpy as np

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in MNIST's IDX format (magic 0x08, ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, name: str, n_train: int = 64, n_test: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_cifar(root: Path, num_classes: int, n_per_file: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder, files, key = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels") if num_classes == 10
                          else ("cifar-100-python", ["train", "test"], "fine_labels"))
    (root / folder).mkdir(parents=True, exist_ok=True)
    for f in files:
        n = n_per_file * (5 if num_classes == 100 and f == "train" else 1)
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: [int(i % num_classes) for i in range(n)]}
        with open(root / folder / f, "wb") as fh:
            pickle.dump(batch, fh)


def write_text(root: Path, names: tuple[str, ...] = ("train.csv", "val.csv", "test.csv", "test_in.csv", "test_shifted.csv"), n: int = 36) -> None:
    words = "the a letter ball house walk dinner garden sister friend marriage fortune".split()
    for name in names:
        with open(root / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for i in range(n):
                writer.writerow([" ".join(words[(i * 7 + j) % len(words)] for j in range(8)), BOOKS[i % len(BOOKS)]])


def write_all(root: Path) -> Path:
    """Every format the zoo's datamodules read, in one folder."""
    root.mkdir(parents=True, exist_ok=True)
    write_mnist_like(root, "MNIST")
    write_mnist_like(root, "FashionMNIST", seed=1)
    write_cifar(root, 10)
    write_cifar(root, 100)
    write_text(root)
    return root


def point_data_dirs(node, data_dir: str):
    """A config's ``data:`` section with every ``data_dir`` pointed at ``data_dir`` (the stand-in files)."""
    if isinstance(node, dict):
        return {k: (data_dir if k == "data_dir" else point_data_dirs(v, data_dir)) for k, v in node.items()}
    if isinstance(node, list):
        return [point_data_dirs(v, data_dir) for v in node]
    return node


def standin_args(config_text: str) -> list[str]:
    """The extra CLI arguments of a config's ``# standin: ...`` lines (tiny models, stand-in checkpoints)."""
    return [arg for line in config_text.splitlines() if line.startswith("# standin:") for arg in shlex.split(line.split(":", 1)[1])]


def fit_config(config: Path, tmp_path: Path, monkeypatch, *args: str, data: Path | None = None):
    """``zoo fit`` of a shipped config on stand-in data (``data`` or :func:`write_all` under ``tmp_path``), with its
    ``# standin:`` arguments, no logger or progress bar, one validation batch, then ``args``; run from ``tmp_path``.
    Returns the CLI (``.model``, ``.trainer``)."""
    import yaml

    import cli

    text = config.read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(data or write_all(tmp_path / "data")))
    patched = tmp_path / config.name
    patched.write_text(yaml.safe_dump(conf))
    monkeypatch.chdir(tmp_path)
    return cli.main(["fit", "--config", str(patched), *standin_args(text), "--trainer.limit_val_batches=1", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", *args])
