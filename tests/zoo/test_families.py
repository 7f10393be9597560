"""zoo.families: every family of the registry, built tiny, has its blocks / attention / FFN where the registry says,
and the techniques that read the registry (SubTuning's layers and split forward pass, EMoE, SN-Net, the pruning
report's roles) agree with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import TINY_VIT, TINY_VIT_KWARGS
from zoo import families
from zoo.backbones import build_backbone
from zoo.emoe.convert import KIND_OF, ffn_family, find_ffns
from zoo.snnet.layers import anchor_blocks, check_anchor
from zoo.subtuning import LayerChain, candidate_layers

HF = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48, "vocab_size": 100}

IMAGE, SMALL_IMAGE = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 8, 8)
TEXT = {"input_ids": torch.randint(0, 100, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}

# family -> (tiny backbone, number of blocks its config asks for, FFN hidden width its config asks for, an input)
TINY = {
    "vit": lambda: (build_backbone(TINY_VIT, **{**TINY_VIT_KWARGS, "depth": 3}), 3, 64, SMALL_IMAGE),  # mlp_ratio 2 x width 32
    "resnet": lambda: (build_backbone("timm/test_resnet", in_chans=1, layers=(1, 2, 1, 1)), 5, None, IMAGE),
    "swin": lambda: (build_backbone("timm/swin_tiny_patch4_window7_224", img_size=32, in_chans=1, embed_dim=8, depths=(3,), num_heads=(1,),
                                    window_size=2, mlp_ratio=2.0), 3, 16, IMAGE),
    "efficientnet": lambda: (build_backbone("timm/test_efficientnet", in_chans=1, depth_multiplier=2.0), 5 * 2, None, IMAGE),
    "bert": lambda: (build_backbone("hf/bert", num_hidden_layers=3, **HF), 3, 48, TEXT),
    "llama": lambda: (build_backbone("hf/llama", num_hidden_layers=3, num_key_value_heads=1, **HF), 3, 48, TEXT),
    "gpt2": lambda: (build_backbone("hf/gpt2", n_embd=32, n_layer=3, n_head=2, n_inner=48, vocab_size=100, n_positions=16,
                                    bos_token_id=0, eos_token_id=0), 3, 48, TEXT),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _dense_width(layer: nn.Module, transposed: bool, side: str) -> int:
    """Output width of an input projection (side="out") or input width of the output projection (side="in")."""
    rows, cols = layer.weight.shape
    if transposed:  # Conv1D: weight is (in, out)
        rows, cols = cols, rows
    return rows if side == "out" else cols


@pytest.mark.parametrize("name", [f.name for f in families.FAMILIES])
def test_every_family_has_its_parts_where_the_registry_says_and_the_techniques_agree(name):
    if name not in TINY:
        pytest.fail(f"family {name!r} is in zoo.families.FAMILIES but has no tiny model in tests/zoo/test_families.py TINY")
    torch.manual_seed(0)
    backbone, depth, ffn_width, x = TINY[name]()
    family = families.family_of(backbone)
    assert family.name == name
    root = families.root_of(backbone)
    modules = dict(root.named_modules())
    blocks = [b for b, _ in families.blocks(backbone)]

    # blocks: real modules, as many as the config asks for, in forward order (the order their forward runs)
    assert len(blocks) == depth and all(b in modules for b in blocks)
    ran: list[str] = []
    hooks = [modules[b].register_forward_pre_hook(lambda m, a, b=b: ran.append(b)) for b in blocks]
    with torch.no_grad():
        backbone.eval()(x)
    for h in hooks:
        h.remove()
    assert ran == blocks

    # attention, FFN and the FFN's dense layers in every block
    for block in blocks:
        for part in family.attention + family.ffn:
            assert f"{block}.{part}" in modules, (block, part)
        dense = [modules.get(f"{block}.{layer}") for layer in family.ffn_layers]
        assert all(any(_under(f"{block}.{layer}", f"{block}.{f}") for f in family.ffn) for layer in family.ffn_layers)
        if family.ffn_layers:  # input projection(s) open the hidden width the config asks for, the output one closes it
            kind = "Conv1D" if family.ffn_transposed else "Linear"
            assert all(type(m).__name__ == kind for m in dense), [type(m).__name__ for m in dense]
            assert [_dense_width(m, family.ffn_transposed, "out") for m in dense[:-1]] == [ffn_width] * (len(dense) - 1)
            assert _dense_width(dense[-1], family.ffn_transposed, "in") == ffn_width
    assert bool(family.ffn) == bool(family.ffn_layers) == (ffn_width is not None)

    # SubTuning's candidate layers are the registry's blocks, and its split forward pass (up to any block, then from it
    # through the family's tail and pooling: zoo.families.features) gives what the whole model gives
    assert candidate_layers(backbone) == blocks
    chain, whole = LayerChain(backbone), backbone(x)
    for start in range(len(blocks) + 1):
        h, ctx = chain.prefix(x, start)
        assert torch.equal(chain.suffix(h, ctx, x, start), whole), start

    # EMoE: the FFNs it converts are the registry's, and the type-based fallback finds the same ones
    at = "model." if root is not backbone else ""
    registry_ffns = [at + f for f in families.ffns(backbone)]
    assert len(registry_ffns) == (depth if family.ffn else 0)
    by_type = [n for n, m in backbone.named_modules() if ffn_family(m)]
    if name in KIND_OF:
        assert find_ffns(backbone) == [(f, KIND_OF[name]) for f in registry_ffns]
        assert by_type == registry_ffns
    else:
        assert find_ffns(backbone) == [] and by_type == []

    # SN-Net stitches the blocks of the vit, resnet and swin families, and names any other family when it refuses it
    if name in ("vit", "resnet", "swin"):
        check_anchor(backbone, "anchor")
        assert anchor_blocks(backbone) == [modules[b] for b in blocks]
    else:
        with pytest.raises(ValueError, match=rf"of the '{name}' family.*SN-Net stitches the blocks of the vit family"):
            check_anchor(backbone, "anchor")

    # roles (the pruning report): every parameter-owning module under a block's attention / FFN has that role
    roles = families.roles(backbone)
    owners = [n for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))]
    assert set(roles) == set(owners)
    for block in blocks:
        for parts, role in ((family.attention, "attention"), (family.ffn, "ffn")):
            for part in parts:
                inside = [n for n in owners if _under(n, f"{block}.{part}")]
                assert inside and all(roles[n] == role for n in inside), (block, part, {n: roles[n] for n in inside})
        rest = [n for n in owners if _under(n, block) and not any(_under(n, f"{block}.{p}") for p in family.attention + family.ffn)]
        assert all(roles[n] == "block" for n in rest)
    assert all(roles[n] == "outside" for n in owners if not any(_under(n, b) for b in blocks))
    assert {roles[n] for n in owners} >= {"outside"} | ({"attention", "ffn"} if family.ffn else {"block"})


def test_unknown_model_fails_with_the_known_families():
    cnn = build_backbone("zoo/convnet", in_chans=1)
    known = ", ".join(repr(f.name) for f in families.FAMILIES)
    assert families.find_family(cnn) is None
    for fail in (lambda: families.family_of(cnn), lambda: families.blocks(cnn), lambda: candidate_layers(cnn)):
        with pytest.raises(ValueError, match=rf"{type(cnn).__name__}: known families are \[{known}\]"):
            fail()
    with pytest.raises(ValueError, match=rf"no known model family \(known: \[{known}\]\)"):
        check_anchor(cnn, "anchor 0")
    assert families.roles(cnn) and set(families.roles(cnn).values()) == {"outside"}
    with pytest.raises(ValueError, match=rf"no model family 'vit2': known families are \[{known}\]"):
        families.by_name("vit2")
