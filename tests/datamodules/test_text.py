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


def token_batches(loader, epoch: int | None = None, n: int | None = None) -> list:
    if epoch is not None:
        loader.batch_sampler.sampler.set_epoch(epoch)
    return list(loader) if n is None else [b for _, b in zip(range(n), loader)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.inputs.keys() == y.inputs.keys()
        for k in x.inputs:
            assert x.inputs[k].dtype == y.inputs[k].dtype and torch.equal(x.inputs[k], y.inputs[k]), k
        for f in ("targets", "index"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None and v is None) or torch.equal(u, v), f


def test_token_tensors_give_the_per_batch_tokenized_batches(tmp_path):
    """fast: tokenized once, gathered by one indexing op: the same batches, in the same seeded order, as tokenizing each
    batch (fast: false), across epochs, with samples_per_class and with_index, after a mid-epoch resume, and for eval."""
    from datamodules.tensor import Gathered, eval_batches

    words = ["a", "quiet", "long", "sentence", "about", "the", "weather", "today", "and", "tomorrow"]
    rows = [(" ".join(words[: 1 + (7 * i) % 10]) + f" {i}", ("pos", "neg", "mid")[i % 3]) for i in range(45)]
    write_csv(tmp_path / "train.csv", rows)
    kw = dict(data_dir=str(tmp_path), text_column="sentence", label_column="sentiment", val_fraction=0.2, batch_size=4, max_length=12,
              samples_per_class=10, with_index=True, seed=2)
    fast, slow = TextClassification(fast=True, **kw), TextClassification(fast=False, **kw)
    fast.setup()
    slow.setup()
    assert fast.train_set.gatherable() and not slow.train_set.gatherable()
    assert fast.train_set.dataset.tokens["input_ids"].dtype == torch.int32 and fast.train_set.dataset.tokens["input_ids"].shape[1] == 12
    assert isinstance(fast.train_set.__getitems__([0, 1]), Gathered)
    for epoch in (0, 1):
        assert_same_batches(token_batches(fast.train_dataloader(), epoch), token_batches(slow.train_dataloader(), epoch))
    widths = {b.inputs["input_ids"].shape[1] for b in token_batches(fast.train_dataloader(), 0)}
    assert len(widths) > 1  # padded per batch, as the tokenizer pads
    for split in ("val", "test"):
        assert_same_batches(list(getattr(fast, f"{split}_dataloader")()), list(getattr(slow, f"{split}_dataloader")()))
    loader = fast.train_dataloader()  # resume mid-epoch: the rest of the epoch as the uninterrupted run
    head = token_batches(loader, 1, 2)
    again = fast.train_dataloader()
    again.load_state_dict(loader.state_dict())
    assert_same_batches(head + token_batches(again, 1), token_batches(slow.train_dataloader(), 1))
    view = fast.eval_view("train")  # read without a loader (teacher caching): the view's own samples
    assert_same_batches(list(eval_batches(view, 4)), list(eval_batches(slow.eval_view("train"), 4, collate_fn=slow.collate_fn)))
    from datamodules.text import TokenRows

    texts, tok = [t for t, _ in rows], fast.tokenizer
    for side in ("right", "left"):  # a batch cut from the tokens of the whole set = the batch tokenized alone, either side
        tok.padding_side = side
        every = TokenRows(texts, [0] * len(texts), dict(tok(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")), side)
        for pick in ([0, 3], [1, 2, 9], [4]):
            alone = tok([texts[i] for i in pick], padding=True, truncation=True, max_length=12, return_tensors="pt")
            got = every.gather(torch.tensor(pick))
            assert all(torch.equal(got[k], alone[k]) for k in alone) and got.keys() == alone.keys()
