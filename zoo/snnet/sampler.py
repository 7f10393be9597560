"""StitchSampler: the stitch of each training step, the same on every process and after a resume."""

from __future__ import annotations

import torch

class StitchSampler:
    """Draws the stitch of each training step; identical on every process and after a resume.

    ``uniform``: every stitch equally likely (SN-Net). ``flops`` (SN-Netv2's resource-constrained
    sampling): stitches sorted by FLOPs are grouped, a new group starting when a stitch exceeds its
    group's first member by more than ``flops_gap`` times the largest FLOPs; a group is drawn
    (``group_weights``: ``uniform``, ``size`` for proportional to its stitch count, or one weight per
    group), then a stitch within it uniformly. Draw ``n`` depends only on ``(seed, n)``, so all DDP
    ranks agree without communication; ``state_dict`` holds the draw count for checkpoints.
    """

    MODES = ("uniform", "flops")

    def __init__(self, flops: list[float], mode: str = "uniform", flops_gap: float = 0.05, group_weights: str | list[float] = "uniform", seed: int = 0):
        if mode not in self.MODES:
            raise ValueError(f"sampling={mode!r}: expected one of {self.MODES}")
        if not flops_gap >= 0:
            raise ValueError(f"flops_gap={flops_gap}: expected a fraction >= 0 of the largest stitch's FLOPs")
        self.mode, self.seed, self.draws = mode, seed, 0
        order = sorted(range(len(flops)), key=lambda i: (flops[i], i))
        if mode == "uniform":
            self.groups = [order]
        else:
            gap, self.groups = flops_gap * max(flops), []
            for i in order:
                if self.groups and flops[i] - flops[self.groups[-1][0]] <= gap:
                    self.groups[-1].append(i)
                else:
                    self.groups.append([i])
        if isinstance(group_weights, str):
            if group_weights not in ("uniform", "size"):
                raise ValueError(f"group_weights={group_weights!r}: expected 'uniform', 'size' or a list of one weight per group")
            weights = [1.0 if group_weights == "uniform" else float(len(g)) for g in self.groups]
        else:
            weights = [float(w) for w in group_weights]
            if len(weights) != len(self.groups) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"group_weights={group_weights}: expected {len(self.groups)} non-negative weights (one per FLOPs group), not all zero")
        self.probs = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def sample(self) -> int:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) % (2**63))
        self.draws += 1
        group = self.groups[int(torch.multinomial(self.probs, 1, generator=gen))]
        return group[int(torch.randint(len(group), (1,), generator=gen))]

    def state_dict(self) -> dict:
        return {"draws": self.draws, "seed": self.seed, "mode": self.mode, "groups": self.groups}

    def load_state_dict(self, state: dict) -> None:
        if state["groups"] != self.groups or state["mode"] != self.mode:
            raise ValueError(f"the checkpoint's stitch sampler ({state['mode']}, {len(state['groups'])} groups) does not match this one "
                             f"({self.mode}, {len(self.groups)} groups): resume with the same anchors and sampling settings")
        self.seed, self.draws = state["seed"], state["draws"]
