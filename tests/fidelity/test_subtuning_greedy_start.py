"""Issue 16, item 10: the official greedy start (talswisa/SubTuning ``greedy_start``, our ``start: both``).

Official: score "all layers" and "no layers"; search from all layers (removing one per round) if that is
strictly better, else from no layer (adding one per round). Checked against a hand-built scorer.
"""

from __future__ import annotations

import inspect

import pytest

from callbacks.subtuning_profile import SubTuningProfile
from zoo.subtuning import greedy_select

LAYERS = ["a", "b", "c", "d"]


def table_scorer(table):
    calls = []

    def score(s):
        calls.append(tuple(s))
        return table[tuple(s)]

    return score, calls


def test_both_starts_from_all_layers_when_they_score_higher():
    # all > none: remove layers. Round 1 drops "d" (0.80), round 2 drops "c" (0.82); round 3's best (0.60) is
    # below 0.82 - 0.01, so the search stops with (a, b).
    table = {
        (): 0.50, ("a", "b", "c", "d"): 0.70,
        ("b", "c", "d"): 0.55, ("a", "c", "d"): 0.60, ("a", "b", "d"): 0.65, ("a", "b", "c"): 0.80,
        ("b", "c"): 0.58, ("a", "c"): 0.59, ("a", "b"): 0.82,
        ("b",): 0.55, ("a",): 0.60,
    }
    score, calls = table_scorer(table)
    chosen, acc, history = greedy_select(LAYERS, score, start="both", epsilon=0.01)
    assert chosen == ("a", "b") and acc == 0.82
    assert [h["layers"] for h in history if h["round"] == 0] == [("a", "b", "c", "d"), ()]
    assert [(h["round"], h["layers"]) for h in history[2:]] == [
        (1, ("b", "c", "d")), (1, ("a", "c", "d")), (1, ("a", "b", "d")), (1, ("a", "b", "c")),
        (2, ("b", "c")), (2, ("a", "c")), (2, ("a", "b")),
        (3, ("b",)), (3, ("a",)),
    ]
    assert len(calls) == len(set(calls)) == len(history)  # every set scored once
    # The same search as start="all", plus one extra score (no layer) at round 0.
    assert greedy_select(LAYERS, table_scorer(table)[0], start="all", epsilon=0.01)[:2] == (chosen, acc)


def test_both_starts_from_no_layer_when_it_scores_higher_or_ties():
    # none >= all: add layers. Round 1 adds "c" (0.70), round 2 adds "a" (0.75); round 3's best (0.60) stops it.
    table = {
        (): 0.60, ("a", "b", "c", "d"): 0.55,
        ("a",): 0.62, ("b",): 0.61, ("c",): 0.70, ("d",): 0.40,
        ("a", "c"): 0.75, ("b", "c"): 0.72, ("c", "d"): 0.50,
        ("a", "b", "c"): 0.60, ("a", "c", "d"): 0.58,
    }
    chosen, acc, history = greedy_select(LAYERS, table_scorer(table)[0], start="both", epsilon=0.01)
    assert chosen == ("a", "c") and acc == 0.75
    assert {h["layers"] for h in history if h["round"] == 1} == {("a",), ("b",), ("c",), ("d",)}
    assert {h["layers"] for h in history if h["round"] == 2} == {("a", "c"), ("b", "c"), ("c", "d")}
    assert {h["layers"] for h in history if h["round"] == 3} == {("a", "b", "c"), ("a", "c", "d")}
    # A tie goes to no layer, as in the official code (``all_acc > non_acc`` picks all).
    table[("a", "b", "c", "d")] = 0.60
    _, _, history = greedy_select(LAYERS, table_scorer(table)[0], start="both", epsilon=0.01)
    assert {h["layers"] for h in history if h["round"] == 1} == {("a",), ("b",), ("c",), ("d",)}


def test_both_is_accepted_by_the_callback_and_k_applies_in_the_chosen_direction():
    assert SubTuningProfile(start="both").start == "both" == SubTuningProfile().start  # the official start is the default
    assert inspect.signature(greedy_select).parameters["start"].default == "both"
    with pytest.raises(ValueError, match="both"):
        SubTuningProfile(start="either")
    table = {(): 0.5, ("a", "b", "c", "d"): 0.9, ("b", "c", "d"): 0.8, ("a", "c", "d"): 0.95, ("a", "b", "d"): 0.7, ("a", "b", "c"): 0.6}
    # from all layers, k is the smallest set: one removal, then stop at 3 layers
    assert greedy_select(LAYERS, table_scorer(table)[0], start="both", k=3) == (
        ("a", "c", "d"), 0.95,
        [{"round": 0, "layers": ("a", "b", "c", "d"), "val_acc": 0.9}, {"round": 0, "layers": (), "val_acc": 0.5}]
        + [{"round": 1, "layers": s, "val_acc": table[s]} for s in [("b", "c", "d"), ("a", "c", "d"), ("a", "b", "d"), ("a", "b", "c")]],
    )
