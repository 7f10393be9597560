"""EMoE (issue 16 item 17): which FFNs become experts by default, per family, as the official scripts (qiuzh20/EMoE).

GPT-2 XL (48 layers): ``--moe_layers 44 --num_experts 64 --top_k 32`` (``Language/README.md``); BERT-base (12):
``--moe_layers 10``, 64 experts, top-16; Llama-7B (32): ``--split_start_layer 16 --split_every_layer 4`` (64 experts,
top-16; ``EMoE_LLaMA/run_7B_emo.sh``). Other depths scale: GPT-2 ``floor(44 L / 48)``, BERT ``L - 2``, Llama from
``L / 2`` every ``max(1, L / 8)``.
"""

from __future__ import annotations

import pytest

from zoo.backbones import build_backbone
from zoo.emoe import Moefy, paper_defaults


def gpt2(depth: int):
    return build_backbone("hf/gpt2", n_embd=16, n_layer=depth, n_head=1, vocab_size=20, n_positions=8, bos_token_id=0, eos_token_id=0)


def llama(depth: int):
    return build_backbone("hf/llama", hidden_size=16, num_hidden_layers=depth, num_attention_heads=1, num_key_value_heads=1,
                          intermediate_size=64, vocab_size=20)


def test_official_depths_give_the_official_layers():
    assert paper_defaults("gpt2", 48) == (64, 32, [44])
    assert paper_defaults("bert", 12) == (64, 16, [10])
    assert paper_defaults("llama", 32) == (64, 16, [16, 20, 24, 28])
    assert paper_defaults("vit", 12) == paper_defaults("timm", 12)  # zoo.families names work too
    experts, top_k, names = Moefy().resolve(gpt2(48))  # FFN width 64: the official 64 experts of one neuron each
    assert (experts, top_k) == (64, 32) and len(names) == 1 and names[0].endswith("h.44.mlp")
    _, _, names = Moefy().resolve(llama(32))
    assert [int(n.split(".")[-2]) for n in names] == [16, 20, 24, 28]


@pytest.mark.parametrize("depth,layers", [(12, [11]), (6, [5]), (2, [1]), (24, [22])])
def test_gpt2_scaled_by_depth(depth, layers):
    assert paper_defaults("gpt2", depth)[2] == layers
    _, _, names = Moefy().resolve(gpt2(depth))
    assert [int(n.split(".")[-2]) for n in names] == layers


def test_llama_and_bert_scaled_by_depth():
    assert paper_defaults("llama", 16)[2] == [8, 10, 12, 14]
    assert paper_defaults("llama", 4)[2] == [2, 3]
    assert paper_defaults("bert", 6)[2] == [4]
