"""EMoE (issue 16 item 13): the neurons are split into experts by balanced k-means with the official settings.

Official (qiuzh20/EMoE ``Language/moe_utils.py``): ``KMeansConstrained(n_clusters=N, size_min=H/N, size_max=H/N,
random_state=0, max_iter=1000)`` (so the library's ``n_init=10``) on the L2-normalised keys (float32, rows of the first
FFN weight).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from k_means_constrained import KMeansConstrained
from torch import nn

from zoo.emoe import EMoEFFN, EMoEModule, Moefy, balanced_clusters, moefy


def _official(keys: torch.Tensor, n: int, seed: int, n_init: int = 10) -> torch.Tensor:
    size = keys.shape[0] // n
    km = KMeansConstrained(n_clusters=n, size_min=size, size_max=size, random_state=seed, n_init=n_init, max_iter=1000)
    return torch.from_numpy(km.fit(F.normalize(keys, dim=1, p=2).numpy()).labels_).long()


def test_default_clustering_is_the_official_kmeans():
    keys = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
    for seed in (0, 3):
        assert torch.equal(balanced_clusters(keys, 4, seed=seed), _official(keys, 4, seed))
    # one restart gives other clusters on this matrix (the test would notice a default of 1)
    assert not torch.equal(_official(keys, 4, 0, n_init=1), _official(keys, 4, 0))
    fc1, fc2 = nn.Linear(8, 48), nn.Linear(48, 8)
    with torch.no_grad():
        fc1.weight.copy_(keys)
    layer = EMoEFFN(fc1.weight, fc1.bias, fc2.weight, fc2.bias, nn.GELU(), num_experts=4, top_k=1)  # seed 0, as official
    labels = torch.empty(48, dtype=torch.long)
    labels[layer.neuron_order] = torch.arange(4).repeat_interleave(12)
    assert torch.equal(labels, _official(keys, 4, 0))


def test_every_entry_point_defaults_to_ten_restarts():
    assert inspect.signature(balanced_clusters).parameters["n_init"].default == 10
    assert inspect.signature(balanced_clusters).parameters["max_iter"].default == 1000
    for fn in (moefy, EMoEFFN.__init__, EMoEModule.__init__):
        assert inspect.signature(fn).parameters["cluster_inits"].default == 10, fn
    assert Moefy().cluster_inits == 10
