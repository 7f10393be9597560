"""Issue 16 item 5: SN-Net costs in multiply-adds (MACs), the unit of the papers and their fvcore budgets.

Official (ziplab/SN-Net ``stitching_deit/engine.py``) counts with fvcore's ``FlopCountAnalysis``: one per multiply-add
(DeiT-S: 4.6 G, ``results/stitches_res.txt``), plus 5 per LayerNorm element; ``torch.utils.flop_counter`` counts 2 per
multiply-add. SN-Netv2 groups stitches ``flops_gap`` = 1.0 of those G apart (``classification/utils.py``).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import yaml

from callbacks.stitch_sweep import best_under_budget, table_rows
from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo.backbones import build_backbone
from zoo.snnet import SNNetModule, StitchableNet

ROOT = Path(__file__).resolve().parents[2]
KW = {**TINY_VIT_KWARGS, "img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def tiny_net(widths=(16, 32)) -> StitchableNet:
    torch.manual_seed(0)
    anchors = [build_backbone(TINY_VIT, **{**KW, "embed_dim": w}) for w in widths]
    return StitchableNet(anchors, [torch.nn.Linear(a.num_features, 10) for a in anchors])


def vit_macs(width: int, depth: int = 2, classes: int = 10) -> int:
    """Multiply-adds of one image through a ViT, by hand: patch conv, per block qkv/proj/fc1/fc2 and the two attention products, head."""
    patches = (KW["img_size"] // KW["patch_size"]) ** 2
    n, hidden = patches + 1, int(width * KW["mlp_ratio"])
    embed = patches * KW["in_chans"] * KW["patch_size"] ** 2 * width
    block = n * width * 3 * width + n * width * width + 2 * n * width * hidden + 2 * n * n * width  # q@k^T and attn@v over all heads
    return embed + depth * block + width * classes


def official_grouping(macs: list[int], gap_gmacs: float) -> list[list[int]]:
    """SN-Netv2 ``group_subnets_by_flops``, written from its definition: sorted by cost, a group starts when a stitch is more
    than the gap above the current group's first member (the first group is measured from 0)."""
    groups, ref = [], 0.0
    for i in sorted(range(len(macs)), key=lambda i: (macs[i], i)):
        if abs(macs[i] / 1e9 - ref) > gap_gmacs:
            groups.append([i])
            ref = macs[i] / 1e9
        elif groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def test_linear_and_tiny_vit_macs_equal_the_hand_count():
    net = tiny_net()
    tokens = (KW["img_size"] // KW["patch_size"]) ** 2 + 1
    parts = net.part_flops()
    assert parts[("layer", 0, 1, 0)] == 2 * tokens * 16 * 32  # one stitching layer (an nn.Linear): 2 FLOPs per in*out*tokens
    macs = net.macs()
    assert [macs[i] for i in net.anchor_ids] == [vit_macs(16), vit_macs(32)]
    assert macs == [f // 2 for f in net.flops()] and net.macs(2) == macs[2]
    s = net.stitches[2]  # A0 blocks [0, j], stitching layer, A1 blocks [k, 2)
    (j, k), = s.cuts
    per_block = {w: (vit_macs(w) - vit_macs(w, depth=0)) // 2 for w in (16, 32)}
    front = vit_macs(16, depth=0) - 16 * 10  # patch embedding of the front anchor (its head is not run)
    assert macs[2] == front + (j + 1) * per_block[16] + tokens * 16 * 32 + (2 - k) * per_block[32] + 32 * 10


def test_deit_macs_are_the_papers_figures():
    """DeiT-Ti / DeiT-S (random weights) give the official fvcore counts less fvcore's LayerNorm term (5 per element)."""
    anchors = [timm.create_model(name, pretrained=False, num_classes=0) for name in ("deit_tiny_patch16_224", "deit_small_patch16_224")]
    net = StitchableNet(anchors, [torch.nn.Linear(a.num_features, 1000) for a in anchors])
    official = {192: 1_258_411_200, 384: 4_608_338_304}  # stitches_res.txt cfg_id 0 and 1 (DeiT-Ti, DeiT-S)
    for i in net.anchor_ids:
        width = net.anchors[i].embed_dim
        layer_norms = 5 * 197 * width * (2 * 12 + 1)
        assert net.macs(i) + layer_norms == official[width]
    assert net.macs(net.anchor_ids[1]) <= 4.6e9 < net.flops(net.anchor_ids[1])  # DeiT-S fits the paper's 4.6 G budget in MACs only
    config = yaml.safe_load((ROOT / "configs/snnet/deit_ti_s_b.yaml").read_text())
    budget = config["callbacks"]["sweep"]["init_args"]
    assert set(budget) == {"max_macs"} and float(budget["max_macs"]) == 4.6e9


def test_sweep_and_sampler_use_macs():
    net = tiny_net((16, 32, 48))
    macs = net.macs()
    rows = table_rows(net, [m / max(macs) for m in macs])  # accuracy grows with cost: the pick is the costliest that fits
    assert [r["macs"] for r in rows] == macs and all(r["flops"] == 2 * r["macs"] for r in rows)
    budget = macs[net.anchor_ids[1]]
    assert best_under_budget(rows, max_macs=budget)["macs"] == budget
    assert best_under_budget(rows, max_flops=budget)["flops"] <= budget < 2 * budget  # the same number read as FLOPs: half the network
    gap = (max(macs) - min(macs)) / 4 / 1e9  # in GMACs, small enough for several groups at this size
    module = SNNetModule([{"model": TINY_VIT, "model_kwargs": {**KW, "embed_dim": w}} for w in (16, 32, 48)], sampling="flops", flops_gap=gap)
    module.configure_model()
    assert module.net.macs() == macs
    assert [sorted(g) for g in module.sampler.groups] == official_grouping(macs, gap)
    assert len(module.sampler.groups) > 2
    assert official_grouping([2 * m for m in macs], gap) != official_grouping(macs, gap)  # FLOPs (2x) would group differently
    default = SNNetModule([{"model": TINY_VIT, "model_kwargs": {**KW, "embed_dim": w}} for w in (16, 32)], sampling="flops")
    default.configure_model()
    assert default.hparams.flops_gap == 1.0 and default.hparams.flops_gap_unit == "gmacs"  # official gap 1 GMAC: one group at this size
    assert default.sampler.groups == [sorted(range(len(default.net)), key=lambda i: (default.net.macs(i), i))]


def test_checkpoints_saved_before_gmacs_keep_their_fraction_groups(tmp_path):
    """``flops_gap`` was a fraction of the largest stitch's cost before it meant GMACs: old checkpoints resume with their groups."""
    import lightning as L

    from datamodules import Digits

    module = SNNetModule([{"model": TINY_VIT, "model_kwargs": {**KW, "embed_dim": w}} for w in (32, 16)], sampling="flops", flops_gap=0.05,
                         flops_gap_unit="fraction", init_batch_size=None)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, Digits(batch_size=8))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    for key in ("flops_gap_unit", "sample_per_rank", "init_batch_size", "init_mode"):  # the hyperparameters of before
        del ckpt["hyper_parameters"][key]
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = SNNetModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert len(module.sampler.groups) > 1 and old.sampler.groups == module.sampler.groups and old.sampler.draws == 2
