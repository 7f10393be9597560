"""Every technique trains with ``--trainer.precision=bf16-mixed`` on CPU (issue 18 item 5), and what the papers keep in
float32 stays float32: losses, routing gates, least-squares solves, the replay buffer's stored logits.

One short in-process ``zoo fit`` per technique (its main config on tiny stand-in data, as tests/test_resume.py runs
them, 3 steps). The :class:`Probe` callback checks that the steps ran under bf16 autocast (the logits are bf16), that
every loss term returned at least float32, that the loss and gradients are finite, that the parameters stay float32
(master weights) and that those with a gradient at the first step changed. Each case then checks its own float32
parts, recorded by wrapping the function that makes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.helpers import ROOT
from tests.standin import point_data_dirs, standin_args

FULL = (torch.float32, torch.float64)
SHORT = ["--trainer.max_steps=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
         "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false",
         "--trainer.precision=bf16-mixed", "--trainer.callbacks+=tests.test_bf16.Probe"]


class Probe(Callback):
    """Records, per training step, the dtypes the loss terms saw and returned; checks gradients and weights."""

    def __init__(self):
        self.terms: dict[str, set] = {}  # term name -> {(logits dtype, output dtype, autocast on, autocast dtype)}
        self.losses: list[torch.Tensor] = []
        self.grads_finite: list[bool] = []
        self.first: dict[str, torch.Tensor] | None = None
        self._hooks: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        for term in pl_module.losses:
            self._hooks.append(term.register_forward_hook(
                lambda m, args, out, name=term.name: self.terms.setdefault(name, set()).add(
                    (args[0].logits.dtype, out.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grads_finite.append(bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads) and all(g.dtype == torch.float32 for g in grads))
        if self.first is None:  # weights just before the first optimizer step, of parameters with a gradient
            self.first = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None and bool(p.grad.any())}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().clone())

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self._hooks:
            h.remove()


def run_config(config: str, data: Path, tmp_path: Path, monkeypatch, *args: str, patch: dict | None = None, model: dict | None = None,
               drop_callbacks: bool = False):
    """``zoo fit`` of ``config`` on stand-in data under bf16-mixed, 3 steps; ``patch``: ``{class_path: init_args}``
    merged wherever the config uses that class; ``model``: init_args merged into the model's; ``drop_callbacks``: without
    the config's own callbacks (those that run after training, e.g. SN-Net's sweep). Returns the CLI."""
    import cli

    text = (ROOT / "configs" / config).read_text()
    conf = yaml.safe_load(text)
    conf["data"] = point_data_dirs(conf["data"], str(data))

    def patched(node):
        if isinstance(node, list):
            return [patched(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: patched(v) for k, v in node.items()}
        if patch and node.get("class_path") in patch:
            node["init_args"] = {**(node.get("init_args") or {}), **patch[node["class_path"]]}
        return node

    conf = patched(conf)
    if drop_callbacks:
        conf.pop("callbacks", None)
    conf["model"]["init_args"].update(model or {})
    path = tmp_path / Path(config).name
    path.write_text(yaml.safe_dump(conf))
    monkeypatch.chdir(tmp_path)
    nested = "data" in (conf["data"].get("init_args") or {})
    batch = "--data.init_args.data.init_args.batch_size=8" if nested else "--data.init_args.batch_size=8"
    return cli.main(["fit", "--config", str(path), *standin_args(text), batch, *SHORT, *args])


def probe_of(run) -> Probe:
    return next(c for c in run.trainer.callbacks if isinstance(c, Probe))


def check_trained(run) -> Probe:
    """Ran 3 steps under bf16 autocast; finite float32 losses and gradients; float32 weights, changed by training."""
    probe = probe_of(run)
    assert run.trainer.global_step == 3 and len(probe.losses) == 3
    assert all(loss.dtype in FULL and bool(torch.isfinite(loss)) for loss in probe.losses), probe.losses
    assert probe.grads_finite == [True] * 3
    assert probe.terms, "no loss term ran"
    for name, seen in probe.terms.items():
        for logits, out, autocast, dtype in seen:
            assert autocast and dtype == torch.bfloat16, f"term {name} ran outside bf16 autocast"
            assert out in FULL, f"term {name} returned {out} under bf16-mixed (expected float32 or float64)"
    assert any(logits == torch.bfloat16 for seen in probe.terms.values() for logits, *_ in seen), "the logits were never bf16"
    params = dict(run.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values()), {n: p.dtype for n, p in params.items() if p.dtype != torch.float32}
    assert probe.first, "no parameter had a gradient"
    unchanged = [n for n, w in probe.first.items() if n in params and torch.equal(params[n].detach(), w)]
    assert not unchanged, f"not trained: {unchanged[:5]}"
    return probe


def recorder(monkeypatch, owner, name: str, record: list, what=lambda args, out: out):
    """Wrap ``owner.name`` so that each call appends ``what(args, result)`` to ``record``."""
    fn = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        record.append(what(args, out))
        return out

    monkeypatch.setattr(owner, name, wrapped)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.standin import write_all

    return write_all(tmp_path_factory.mktemp("standin"))


def case_classifier(data, tmp_path, monkeypatch):
    run = run_config("quickstart.yaml", data, tmp_path, monkeypatch)
    probe = check_trained(run)
    assert {out for seen in probe.terms.values() for _, out, *_ in seen} == {torch.float32}  # cross-entropy in float32


def case_distill(data, tmp_path, monkeypatch):
    """Soft targets, labels, hidden states (projected) and attention maps: student taps are bf16, the terms are not."""
    from zoo.distillation import losses as D

    taps = []
    recorder(monkeypatch, D.AttentionDistill, "compute", taps, lambda args, out: (args[1].attentions, args[2].attentions, out.dtype))
    run = run_config("distill/vit_to_small_vit.yaml", data, tmp_path, monkeypatch)
    probe = check_trained(run)
    assert probe.terms["soft_target_kl"] == {(torch.bfloat16, torch.float64, True, torch.bfloat16)}  # logit KD in float64
    assert {out for _, out, *_ in probe.terms["hidden_state_distill"]} == {torch.float32}
    student, teacher, out = taps[0]
    assert {a.dtype for a in student.values()} == {a.dtype for a in teacher.values()} == {torch.bfloat16} and out == torch.float32


def case_distill_kd_family(data, tmp_path, monkeypatch):
    """Decoupled KD, DeiT's hard distillation and a FitNets hint through a learned projector."""
    losses = [{"class_path": "zoo.distillation.DecoupledKD", "init_args": {"warmup": 0}},
              {"class_path": "zoo.distillation.HardDistill"},
              {"class_path": "zoo.distillation.FeatureHint", "init_args": {"student_layer": "blocks.1", "teacher_layer": "blocks.3"}}]
    run = run_config("distill/vit_to_small_vit.yaml", data, tmp_path, monkeypatch, model={"losses": losses})
    probe = check_trained(run)
    assert {out for _, out, *_ in probe.terms["decoupled_kd"]} == {torch.float64}
    assert {out for _, out, *_ in probe.terms["hard_distill"]} == {torch.float64}
    assert {out for _, out, *_ in probe.terms["feature_hint"]} == {torch.float32}
    from zoo.distillation import FeatureHint

    hint = run.model.loss_term(FeatureHint)
    assert hint.projector is not None and hint.projector.weight.dtype == torch.float32


def _emoe(data, tmp_path, monkeypatch, **model):
    from zoo.emoe.layers import EMoEFFN
    from k_means_constrained import KMeansConstrained

    gates, points = [], []
    recorder(monkeypatch, EMoEFFN, "logits", gates, lambda args, out: (args[1].dtype, out.dtype, torch.is_autocast_enabled("cpu")))
    recorder(monkeypatch, KMeansConstrained, "fit_predict", points, lambda args, out: args[1].dtype)
    run = run_config("emoe/vit_fmnist.yaml", data, tmp_path, monkeypatch, model={"balance_loss_weight": 0.01, "cluster_inits": 1, **model})
    probe = check_trained(run)
    assert points and {str(p) for p in points} == {"float32"}  # the balanced k-means of the keys
    assert any(autocast for *_, autocast in gates), "the router never ran under autocast"
    assert {out for _, out, _ in gates} == {torch.float32}  # fp32_gate: the routing logits
    assert {out for _, out, *_ in probe.terms["balance_loss"]} == {torch.float32}
    return run


def case_emoe(data, tmp_path, monkeypatch):
    """Emergent (mean-key) gate: k-means on float32 keys, float32 routing logits and load-balance loss."""
    _emoe(data, tmp_path, monkeypatch)


def case_emoe_learned(data, tmp_path, monkeypatch):
    """EMoE-learn's cosine router (tutel ``CosineTopKGate``, ``fp32_gate``): float32 logits, its weights trained."""
    run = _emoe(data, tmp_path, monkeypatch, gate="learned")
    routers = [m.router for m in run.model.modules() if getattr(m, "router_kind", None) == "cosine"]
    assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    assert any(n in probe_of(run).first for n, _ in run.model.named_parameters() if "router" in n)  # the router got gradients


def case_snnet(data, tmp_path, monkeypatch):
    """Least-squares init of the stitching layers: float32 features in, float32 weights out (solved in float64)."""
    from zoo.snnet import net as N

    solves = []
    recorder(monkeypatch, N, "least_squares", solves, lambda args, out: (args[0].dtype, args[1].dtype, out[0].dtype, out[1].dtype))
    run = run_config("snnet/stitch.yaml", data, tmp_path, monkeypatch, drop_callbacks=True)  # the sweep runs after training
    check_trained(run)
    assert solves and set(solves) == {(torch.float32,) * 4}
    net = run.model.net
    assert bool(net.ls_initialized) and all(p.dtype == torch.float32 for p in net.stitch_layers.parameters())
    # called inside autocast (e.g. from a training step), the solve still sees float32 features: the same layers
    x = torch.randn(8, *net.input_shape)
    net.init_stitching_layers(x)
    reference = {k: v.clone() for k, v in net.stitch_layers.state_dict().items()}
    solves.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.init_stitching_layers(x)
    assert solves and set(solves) == {(torch.float32,) * 4}
    assert all(torch.equal(v, reference[k]) for k, v in net.stitch_layers.state_dict().items())


def case_subtuning(data, tmp_path, monkeypatch):
    """The feature cache holds what the frozen prefix gives under the run's precision: cached == recomputed."""
    run = run_config("subtuning/lite0_fmnist.yaml", data, tmp_path, monkeypatch)
    check_trained(run)
    module = run.model
    cache = module.caches["train"]
    rows = cache.filled.nonzero().flatten()[:4]
    assert len(rows) == 4
    from zoo.batch import as_batch

    dm = run.trainer.datamodule
    samples = [dm.train_dataloader().dataset[int(i)] for i in rows]
    batch = as_batch(dm.collate_fn(samples) if getattr(dm, "collate_fn", None) else torch.utils.data.default_collate(samples)).ready()
    assert torch.equal(batch.index.cpu(), rows.cpu())
    module.eval()  # the frozen prefix is in eval mode in training too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        live = module._uncached_prefix(batch.inputs)
    stored = cache.values[rows.to(cache.values.device)]
    assert stored.dtype == live.dtype == torch.bfloat16  # a CNN prefix under bf16 autocast
    assert torch.equal(stored, live)


def _continual(config: str, data, tmp_path, monkeypatch, *args, model: dict | None = None):
    """A continual run; the logits offered to the buffer were bf16, the buffer keeps them exactly, in float32."""
    from zoo.continual.buffer import ReplayBuffer

    offered = []
    recorder(monkeypatch, ReplayBuffer, "add", offered, lambda args, out: args[4].detach().clone())
    run = run_config(config, data, tmp_path, monkeypatch, *args, model=model)
    probe = check_trained(run)
    buffer = run.model.buffer
    assert {z.dtype for z in offered} == {torch.bfloat16}
    assert buffer.logits.dtype == torch.float32
    stream = torch.cat(offered)
    assert len(buffer) == len(stream) < buffer.capacity  # reservoir before it is full: slot i holds sample i
    assert torch.equal(buffer.logits[:len(buffer)], stream.float())
    return run, probe


def case_er(data, tmp_path, monkeypatch):
    _, probe = _continual("continual/er_split_fmnist.yaml", data, tmp_path, monkeypatch)
    assert {out for _, out, *_ in probe.terms["experience_replay"]} == {torch.float32}


def case_derpp(data, tmp_path, monkeypatch):
    """DER++: the logit MSE against the stored float32 logits and the replayed cross-entropy are float32."""
    from zoo.continual import replay as R

    mse = []
    recorder(monkeypatch, R.F, "mse_loss", mse, lambda args, out: (args[0].dtype, args[1].dtype, out.dtype))
    _, probe = _continual("continual/derpp_split_fmnist.yaml", data, tmp_path, monkeypatch)
    assert {out for _, out, *_ in probe.terms["dark_replay"]} == {torch.float32}
    assert mse and {(s, t, o) for s, t, o in mse} == {(torch.float32,) * 3}


def case_kfpf(data, tmp_path, monkeypatch):
    """k-FPF-KD: FPF after every step on the buffer (cross-entropy + MSE to the stored float32 logits)."""
    from zoo.continual.module import ContinualClassifier

    calls = []
    recorder(monkeypatch, ContinualClassifier, "fpf", calls, lambda args, out: args[1])
    run, _ = _continual("continual/kfpf_split_fmnist.yaml", data, tmp_path, monkeypatch,
                        model={"fpf_every": 1, "fpf_steps": 2, "fpf_alpha": 0.3, "fpf_lr": 0.01})
    assert len(calls) >= 3  # after each of the 3 steps (and at the task end)


def case_pruning(data, tmp_path, monkeypatch):
    """Gradual magnitude pruning at steps 0-2: masks from the float32 weights, 80% zeros baked in at the end."""
    run = run_config("pruning/vit_fmnist_gradual.yaml", data, tmp_path, monkeypatch,
                     patch={"callbacks.pruning_schedules.Cubic": {"start": 0, "end": 2, "frequency": 1}})
    check_trained(run)
    weights = [p for n, p in run.model.named_parameters() if n.startswith("backbone.blocks.") and p.ndim >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)


def case_structured_pruning(data, tmp_path, monkeypatch):
    """Structured pruning (channels removed at the epoch start, traced on a float32 example): the net shrinks."""
    run = run_config("pruning/efficientnet_lite0_structured.yaml", data, tmp_path, monkeypatch)
    check_trained(run)
    from zoo.backbones import build_backbone

    dense = build_backbone("pypi/efficientnet_lite0", False, in_chans=1)
    assert sum(p.numel() for p in run.model.backbone.parameters()) < 0.9 * sum(p.numel() for p in dense.parameters())


def case_qat(data, tmp_path, monkeypatch):
    """QAT (int8_dynamic, fake quant from step 0) under bf16 autocast: the per-token activation scales and roundings
    in float32 (bf16 cannot hold x / scale to the rounding step), the weight scales from the float32 master weights."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    from zoo.quantize import fake

    acts, weights = [], []
    recorder(monkeypatch, fake._per_token_class(), "_per_token_forward", acts, lambda args, out: (args[1].dtype, args[0].scale.dtype, out.dtype))
    recorder(monkeypatch, IntxFakeQuantizer, "_per_channel_or_group_forward", weights, lambda args, out: (args[1].dtype, args[0].scale.dtype))
    run = run_config("quantize/qat_vit.yaml", data, tmp_path, monkeypatch,
                     patch={"callbacks.quantize.QuantizationAwareTraining": {"start_step": 0, "freeze_step": None, "convert": False}})
    check_trained(run)
    assert acts and {scale for _, scale, _ in acts} == {torch.float32} and torch.bfloat16 in {x for x, _, _ in acts}
    assert all(x == out for x, _, out in acts)  # handed on in the dtype it came in
    assert weights and set(weights) == {(torch.float32, torch.float32)}


def case_ptq(data, tmp_path, monkeypatch):
    """PTQ at fit end after a bf16-mixed fit: int8 weights from the float32 master weights, the int8 model's logits
    within the int8 tolerance of the float model's."""
    run = run_config("quantize/ptq_vit.yaml", data, tmp_path, monkeypatch,
                     patch={"callbacks.quantize.PostTrainingQuantization": {"calibration_batches": 1, "save_to": None}})
    cb = next(c for c in run.trainer.callbacks if type(c).__name__ == "PostTrainingQuantization")
    assert cb.report.layers == 16 and 0 < cb.report.logit_rel_error < 0.03
    assert all(hasattr(m.weight, "qdata") and m.weight.dtype == torch.float32 for m in run.model.backbone.modules()
               if isinstance(m, torch.nn.Linear))



def case_lora(data, tmp_path, monkeypatch):
    """DoRA through peft under bf16 autocast: the adapters (float32 master weights) and the head train, the frozen
    base stays bit-identical."""
    from zoo.adapters.lora import lora_layers

    run = run_config("adapters/lora_vit.yaml", data, tmp_path, monkeypatch, "--model.init_args.surgery.init_args.dora=true")
    probe = check_trained(run)
    layers = lora_layers(run.model.backbone)
    assert layers and all(run.model.backbone.get_submodule(n).lora_magnitude_vector for n in layers)  # DoRA layers
    assert probe.first and all("lora_" in n or n.startswith("head.") for n in probe.first), sorted(probe.first)[:5]


def case_e3va(data, tmp_path, monkeypatch):
    """E3VA's gradient highway under bf16 autocast: only the highway's adapters and the head train."""
    run = run_config("adapters/e3va_vit.yaml", data, tmp_path, monkeypatch)
    probe = check_trained(run)
    assert all(n.startswith(("backbone.e3va.", "head.")) for n in probe.first), sorted(probe.first)[:5]


def case_dynamic_rank(data, tmp_path, monkeypatch):
    """Dynamic-rank DoRA (RankSchedule every step) under bf16 autocast: the component-importance scores, from
    float32 master weights and gradients, stay float32 and finite."""
    from zoo.adapters.dynamic_rank import rank_one_layers

    run = run_config("adapters/dynamic_dora.yaml", data, tmp_path, monkeypatch,
                     patch={"callbacks.rank_schedule.RankSchedule": {"interval": 1, "start_ratio": 0.0, "end_ratio": 0.5}})
    check_trained(run)
    layers = [m for _, m in rank_one_layers(run.model)]
    assert layers and all(m.importance.dtype == torch.float32 and bool(torch.isfinite(m.importance).all()) for m in layers)
    assert any(bool(m.importance.any()) for m in layers)  # scored during the run

CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("technique", list(CASES))
def test_trains_in_bf16_mixed(technique: str, data: Path, tmp_path: Path, monkeypatch):
    CASES[technique](data, tmp_path, monkeypatch)
