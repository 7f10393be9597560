import csv
import json

import pytest
import torch

from datamodules import JaneAusten, TextClassification
from datamodules.austen import BOOKS, JANEAUSTENR, read_novels
from zoo.batch import Batch


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        w.writerows(rows)


def test_csv_and_jsonl_with_named_columns(tmp_path):
    write_csv(tmp_path / "train.csv", [(f"good movie {i}", "pos") for i in range(6)] + [(f"bad movie {i}", "neg") for i in range(6)])
    with open(tmp_path / "test.jsonl", "w") as fh:
        for t, lab in (("great", "pos"), ("awful", "neg")):
            fh.write(json.dumps({"sentence": t, "sentiment": lab}) + "\n")
    dm = TextClassification(data_dir=str(tmp_path), test_file="test.jsonl", text_column="sentence", label_column="sentiment", val_fraction=0.25, batch_size=4, with_index=True)
    assert dm.num_classes == 2 and dm.labels == ["neg", "pos"]
    dm.setup()
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3 and dm.test_set.targets == [1, 0]
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.task is None and batch.raw is None
    inputs, labels, index = batch.inputs, batch.targets, batch.index
    assert set(inputs) >= {"input_ids", "attention_mask"} and inputs["input_ids"].shape[0] == 4 and labels.shape == index.shape == (4,)
    decoded = dm.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert decoded.startswith(("good movie", "bad movie"))
    first = dm.train_set[int(index[0])]
    assert first.index == index[0] and first.targets == labels[0] and decoded.startswith(first.inputs)  # the sample at that index
    assert next(iter(dm.test_dataloader())).index is None  # the test split carries none


def test_text_eval_view_adds_the_index_and_leaves_the_split_alone(tmp_path):
    write_csv(tmp_path / "train.csv", [(f"good movie {i}", "pos") for i in range(6)] + [(f"bad movie {i}", "neg") for i in range(6)])
    dm = TextClassification(data_dir=str(tmp_path), text_column="sentence", label_column="sentiment", val_fraction=0.25, batch_size=4)
    dm.setup()
    assert dm.train_set[0].index is None
    with pytest.raises(ValueError, match="SomeCache needs the batch field 'index'.*with_index: true"):
        next(iter(dm.train_dataloader())).require("index", by="SomeCache")
    view = dm.eval_view("train")
    assert not dm.train_set.with_index and view.indices == dm.train_set.indices
    batch = dm.collate_fn([view[i] for i in range(3)])
    assert torch.equal(batch.index, torch.arange(3)) and batch.targets.tolist() == dm.train_set.targets[:3]
    assert dm.tokenizer.decode(batch.inputs["input_ids"][2], skip_special_tokens=True) == dm.train_set[2].inputs


def test_text_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_file not found"):
        TextClassification(data_dir=str(tmp_path))
    write_csv(tmp_path / "train.csv", [("x", "a"), ("y", "b")])
    with pytest.raises(ValueError, match="lack text_column='text'"):
        TextClassification(data_dir=str(tmp_path))
    write_csv(tmp_path / "val.csv", [("z", "c")])
    dm = TextClassification(data_dir=str(tmp_path), val_file="val.csv", text_column="sentence", label_column="sentiment")
    with pytest.raises(ValueError, match=r"labels \['c'\]"):
        dm.setup()


@pytest.fixture(scope="module")
def novels():
    if not JANEAUSTENR.with_suffix(".rdx").exists():
        pytest.fail("janeaustenr is not installed: run `make data` (apt-get install r-cran-janeaustenr)")
    return read_novels()


def test_real_novels_and_shifted_split(novels, tmp_path):
    assert sorted(novels) == sorted(BOOKS)
    assert novels["emma"][0] == "EMMA" and len(novels["prideprejudice"]) > 10000
    dm = JaneAusten(data_dir=str(tmp_path), test_domain="shifted", passage_lines=4)
    rows = {s: list(csv.DictReader(open(tmp_path / f"{s}.csv"))) for s in ("train", "val", "test_in", "test_shifted")}
    texts = {s: {r["text"] for r in v} for s, v in rows.items()}
    assert not texts["train"] & texts["test_in"] and not texts["train"] & texts["test_shifted"]
    assert {r["label"] for r in rows["train"]} == set(BOOKS) and dm.num_classes == 6
    last_lines = " ".join(line.strip() for line in novels["emma"][-400:] if line.strip())
    assert any(r["text"] in last_lines for r in rows["test_shifted"] if r["label"] == "emma")
    assert dm.files["test"].name == "test_shifted.csv"
    with pytest.raises(ValueError, match="test_domain='other'"):
        JaneAusten(data_dir=str(tmp_path), test_domain="other")
