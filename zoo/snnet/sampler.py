"""StitchSampler: the stitch of each training step, a function of (seed, rank, draw count), so resumes continue it."""

from __future__ import annotations

import torch

class StitchSampler:
    """Draws the stitch of each training step; reproducible on every process and after a resume.

    ``uniform``: every stitch equally likely (SN-Net). ``flops`` (SN-Netv2's resource-constrained
    sampling): stitches sorted by cost are grouped, a new group starting when a stitch exceeds its
    group's reference by more than the gap; a group is drawn (``group_weights``: ``uniform``, ``size`` for
    proportional to its stitch count, or one weight per group), then a stitch within it uniformly.

    The gap (``gap_unit``): ``gmacs`` -- ``flops_gap`` GMACs, costs given in multiply-adds, the first group's
    reference 0 and later groups' their first member (official ``group_subnets_by_flops``, ziplab/SN-Netv2
    ``classification/utils.py``, gap 1.0); ``fraction`` -- ``flops_gap`` times the largest cost, each group's
    reference its first member (scale-free, ours).

    Draw ``n`` of rank ``r`` depends only on ``(seed + r, n)``: ``sample(rank=r)`` gives each DDP rank its own
    stream as the official code seeds ``seed + rank`` (``sample()``: every rank the same); ``state_dict`` holds
    the base seed and the draw count, the same on every rank, so each rank's stream resumes from it.
    """

    MODES = ("uniform", "flops")
    GAP_UNITS = ("gmacs", "fraction")

    def __init__(self, flops: list[float], mode: str = "uniform", flops_gap: float = 0.05, group_weights: str | list[float] = "uniform", seed: int = 0,
                 gap_unit: str = "fraction"):
        if mode not in self.MODES:
            raise ValueError(f"sampling={mode!r}: expected one of {self.MODES}")
        if gap_unit not in self.GAP_UNITS:
            raise ValueError(f"gap_unit={gap_unit!r}: expected one of {self.GAP_UNITS}")
        if not flops_gap >= 0:
            raise ValueError(f"flops_gap={flops_gap}: expected a gap >= 0 (GMACs, or a fraction of the largest stitch's cost)")
        self.mode, self.seed, self.draws = mode, seed, 0
        order = sorted(range(len(flops)), key=lambda i: (flops[i], i))
        if mode == "uniform":
            self.groups = [order]
        else:
            official = gap_unit == "gmacs"
            gap, self.groups, ref = (flops_gap * 1e9 if official else flops_gap * max(flops)), [], 0.0
            for i in order:
                joins = flops[i] - ref <= gap and (bool(self.groups) or official)  # official: the first group is measured from 0
                if joins and self.groups:
                    self.groups[-1].append(i)
                else:
                    self.groups.append([i])
                    ref = ref if joins else flops[i]
        if isinstance(group_weights, str):
            if group_weights not in ("uniform", "size"):
                raise ValueError(f"group_weights={group_weights!r}: expected 'uniform', 'size' or a list of one weight per group")
            weights = [1.0 if group_weights == "uniform" else float(len(g)) for g in self.groups]
        else:
            weights = [float(w) for w in group_weights]
            if len(weights) != len(self.groups) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"group_weights={group_weights}: expected {len(self.groups)} non-negative weights (one per FLOPs group), not all zero")
        self.probs = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def sample(self, rank: int = 0) -> int:
        """The next stitch of ``rank``'s stream (rank 0: the single-process stream)."""
        gen = torch.Generator().manual_seed(((self.seed + rank) * 1_000_003 + self.draws) % (2**63))
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
