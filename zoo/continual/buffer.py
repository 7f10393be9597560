"""A fixed-size episodic memory for replay-based continual learning.

Policies:

- ``reservoir`` (Vitter 1985; as in ER, Chaudhry et al. 2019, and DER, Buzzega et al. 2020): after ``n``
  samples of the stream every sample is in the buffer with probability ``capacity / n``.
- ``balanced``: class-balancing reservoir sampling (CBRS, Chrysakis & Moens, ICML 2020): when full, a sample of a
  class that is not among the largest replaces a random sample of a largest class; a sample of a largest class
  ``c`` replaces a random sample of ``c`` with probability ``m_c / n_c`` (kept / seen of that class).

Inputs are stored as given (pass raw ``uint8`` images to store them compactly), with labels, task ids and the
logits at insertion time (for DER), always as float32: under ``bf16-mixed`` the model's bf16 output is upcast
exactly, as Mammoth's buffer allocates every non-label tensor in float32 (``utils/buffer.py``, ``init_tensors``).
``add`` costs O(batch), never O(buffer); ``sample`` one
random permutation of the stored rows (without replacement) or O(batch) (with). Under DDP every rank
keeps its own share (:meth:`set_share`), seeded by rank.
"""

from __future__ import annotations

import random
from typing import Any

import torch

POLICIES = ("reservoir", "balanced")


class ReplayBuffer:
    """Fixed memory of ``capacity`` samples; see the module docstring."""

    def __init__(self, capacity: int, policy: str = "reservoir", seed: int = 0):
        if capacity < 1:
            raise ValueError(f"buffer capacity={capacity}: expected a positive integer")
        if policy not in POLICIES:
            raise ValueError(f"buffer policy={policy!r}: expected one of {POLICIES}")
        self.total_capacity = self.capacity = capacity
        self.policy, self.seed = policy, seed
        self.rng = random.Random(seed)  # insertion draws: Python's RNG, O(1) per draw without tensor overheads
        self.sample_rng = torch.Generator().manual_seed(seed)  # replay draws: one tensor op per batch
        self.seen = self.size = 0
        self.x = self.y = self.t = self.logits = None
        self.class_seen: dict[int, int] = {}
        self.slots: dict[int, list[int]] = {}  # class -> its slots (balanced policy)

    def set_share(self, world_size: int, rank: int) -> None:
        """Keep this rank's share of the total capacity (and a rank-specific random stream)."""
        if self.seen:
            raise RuntimeError("set_share must be called before the first insertion")
        self.capacity = self.total_capacity // world_size + (rank < self.total_capacity % world_size)
        if self.capacity < 1:
            raise ValueError(f"buffer size {self.total_capacity} leaves rank {rank} of {world_size} no memory")
        seed = self.seed + 1_000_003 * rank
        self.rng.seed(seed)
        self.sample_rng.manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def _allocate(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        n, dev = self.capacity, x.device
        self.x = torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=dev)
        self.y = torch.zeros(n, dtype=torch.long, device=dev)
        self.t = torch.zeros(n, dtype=torch.long, device=dev)
        self.logits = torch.zeros((n, *logits.shape[1:]), dtype=torch.float32, device=dev)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, logits: torch.Tensor) -> None:
        """Offer a batch to the buffer (inputs before augmentation)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ReplayBuffer stores tensor inputs, got {type(x).__name__}")
        if self.x is None:
            self._allocate(x, logits)
        slots, src = self._reservoir(len(y)) if self.policy == "reservoir" else self._balanced(y.tolist())
        if slots:
            dev = self.x.device
            slots, src = torch.tensor(slots, device=dev), torch.tensor(src, device=x.device)
            # index_select is several times faster than advanced indexing for a batch of rows
            self.x[slots] = x.index_select(0, src).to(dev)
            self.y[slots] = y.index_select(0, src).to(dev)
            self.t[slots] = t.index_select(0, src).to(dev)
            self.logits[slots] = logits.detach().index_select(0, src).float().to(dev)

    def _reservoir(self, batch: int) -> tuple[list[int], list[int]]:
        writes: dict[int, int] = {}  # slot -> sample; a later sample drawing the same slot wins, as in the sequential algorithm
        for i in range(batch):
            n = self.seen + i  # stream position
            slot = n if n < self.capacity else self.rng.randrange(n + 1)
            if slot < self.capacity:
                writes[slot] = i
        self.seen += batch
        self.size = min(self.capacity, self.seen)
        return list(writes), list(writes.values())

    def _randint(self, n: int) -> int:
        return self.rng.randrange(n)

    def _balanced(self, labels: list[int]) -> tuple[list[int], list[int]]:
        writes: dict[int, int] = {}
        for i, c in enumerate(labels):
            self.seen += 1
            self.class_seen[c] = self.class_seen.get(c, 0) + 1
            mine = self.slots.setdefault(c, [])
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                largest = max(len(s) for s in self.slots.values())
                if len(mine) < largest:  # evict from a largest class
                    victims = [k for k, s in self.slots.items() if len(s) == largest]
                    victim = self.slots[victims[self._randint(len(victims))]]
                else:  # reservoir sampling inside class c
                    if self.rng.random() >= len(mine) / self.class_seen[c]:
                        continue
                    victim = mine
                k = self._randint(len(victim))
                slot = victim[k]
                victim[k] = victim[-1]
                victim.pop()
            mine.append(slot)
            writes[slot] = i
        return list(writes), list(writes.values())

    def sample(self, n: int, replace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A uniform draw ``(x, y, task, logits)``: by default ``min(n, len(self))`` distinct samples, as Mammoth's
        ``get_data`` (``np.random.choice(filled, size=min(n, filled), replace=False)``); ``replace=True``: ``n``
        samples with replacement. Both come from the buffer's own generator (checkpointed: resume is bit-identical)."""
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer")
        if replace:
            idx = torch.randint(self.size, (n,), generator=self.sample_rng)
        else:
            idx = torch.randperm(self.size, generator=self.sample_rng)[:min(n, self.size)]
        idx = idx.to(self.x.device)
        return tuple(v.index_select(0, idx) for v in (self.x, self.y, self.t, self.logits))

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        stored = None if self.x is None else {k: getattr(self, k)[:self.size].cpu().clone() for k in ("x", "y", "t", "logits")}
        return {"capacity": self.capacity, "policy": self.policy, "seen": self.seen, "size": self.size,
                "class_seen": dict(self.class_seen), "slots": {c: list(s) for c, s in self.slots.items()}, "rng": self.rng.getstate(),
                "sample_rng": self.sample_rng.get_state(), "stored": stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise ValueError(f"checkpoint buffer (capacity {state['capacity']}, {state['policy']}) does not match this one "
                             f"(capacity {self.capacity}, {self.policy})")
        self.seen, self.size, self.class_seen = state["seen"], state["size"], dict(state["class_seen"])
        self.rng.setstate(state["rng"])
        self.sample_rng.set_state(state["sample_rng"])
        stored = state["stored"]
        if stored is not None:
            self._allocate(stored["x"], stored["logits"])
            for k, v in stored.items():
                getattr(self, k)[:self.size] = v
        self.slots = {c: list(s) for c, s in state["slots"].items()}

    def to(self, device: torch.device | str) -> ReplayBuffer:
        for k in ("x", "y", "t", "logits"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device))
        return self
