"""LoRA inside the layers SubTuning chose (configs/compose/lora_subtuning.yaml): the surgeries are Freeze then LoRA,
the adapters sit exactly in the attention and FFN linears of the chosen blocks, and after training only those
adapters and the head changed; every other parameter and buffer is bit-identical to the start."""

from __future__ import annotations

import torch
import yaml
from lightning.pytorch import Callback

from tests.helpers import ROOT
from tests.standin import fit_config
from zoo.adapters import LoRA, lora_layers
from zoo.subtuning import Freeze, SubTuningModule

CONFIG = ROOT / "configs" / "compose" / "lora_subtuning.yaml"


def tensors(module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (the state dict of a LoRA module leaves the frozen base out)."""
    return {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}


class Snapshot(Callback):
    """The module's tensors and trainable names when training starts (after the surgery)."""

    def on_train_start(self, trainer, module):
        self.tensors = tensors(module)
        self.trainable = {n for n, p in module.named_parameters() if p.requires_grad}


def test_lora_trains_only_inside_the_chosen_blocks_and_the_rest_is_bit_identical(tmp_path, monkeypatch):
    init = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    (lora,) = init["surgery"]
    assert lora["init_args"]["blocks"] == init["trainable_layers"] == ["blocks.4", "blocks.5"]  # the config keeps both lists equal
    run = fit_config(CONFIG, tmp_path, monkeypatch, "--trainer.max_steps=3", "--data.init_args.batch_size=16",
                     "--trainer.enable_checkpointing=false", "--trainer.callbacks+=tests.compose.test_lora_subtuning.Snapshot")
    module, trainer = run.model, run.trainer
    assert isinstance(module, SubTuningModule) and trainer.global_step == 3
    assert [type(s) for s in module.surgery] == [Freeze, LoRA] and module.trainable_names == ["blocks.4", "blocks.5"]
    # the adapters: exactly the attention and FFN linears of the two chosen blocks (names written by hand)
    expected = {f"blocks.{b}.{layer}" for b in (4, 5) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(lora_layers(module.backbone)) == expected
    (snap,) = [c for c in trainer.callbacks if isinstance(c, Snapshot)]
    adapters = {n for n in snap.tensors if ".lora_" in n}
    assert len(adapters) == 2 * len(expected) and all(n.startswith(("backbone.blocks.4.", "backbone.blocks.5.")) for n in adapters)
    assert snap.trainable == adapters | {"head.weight", "head.bias"}  # the chosen blocks' own weights are frozen too
    after = tensors(module)
    changed = {n for n, t in after.items() if not torch.equal(t, snap.tensors[n])}
    assert changed == snap.trainable  # every adapter and the head trained; nothing else moved, not a bit
    # the frozen prefix (blocks 0-3) still runs without autograd, as in plain SubTuning
    assert module.start == module.chain.names.index("blocks.4") == 4
