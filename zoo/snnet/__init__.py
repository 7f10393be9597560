"""Stitchable networks: one network holding many stitches of a pretrained ViT family.

SN-Net (Pan et al., "Stitchable Neural Networks", CVPR 2023) joins the first blocks of a smaller
anchor to the last blocks of a larger one through a linear *stitching layer* initialised by least
squares; SN-Netv2 (Pan et al., "Stitched ViTs are Flexible Vision Backbones", 2023) adds two-way
stitching (large->small and the chains small->large->small, large->small->large) and low-rank
(LoRA) updates of the stitching layers. One :class:`StitchableNet` holds every stitch: ``select``
switches the active one without rebuilding anything, ``extract`` returns it as a standalone module,
and ``forward_all`` evaluates all stitches at once, computing each shared prefix only once.

Anchors are backbones of the ``vit``, ``resnet`` or ``swin`` families of :mod:`zoo.families` (timm ``VisionTransformer``,
``ResNet``, ``SwinTransformer``; ResNet / Swin stitch inside a stage with 1x1 maps, as the official code), each with its
own classification head; a stitch ends with its END anchor's head. Where stitches may be cut is :mod:`zoo.snnet.space`
(``space: v1 | v2``, ``nearest``)::

    net = StitchableNet([vit_s, vit_m, vit_l], [head_s, head_m, head_l])   # any order: sorted by size
    net.init_stitching_layers(images)         # least squares on one batch of real inputs
    print(net.describe())                     # id, kind, description, FLOPs, params of every stitch
    net.select(17); logits = net(images)      # instant switch
    small = net.extract(17)                   # plain nn.Module, same outputs

As model surgery (what :class:`SNNetModule` does in ``configure_model``)::

    net = Stitch(kernel_size=2, two_way=True)(Anchors.build(["timm/deit_tiny_patch16_224", "timm/deit_small_patch16_224"], 10))
    plain = Stitch().undo(net)                # the selected stitch, as extract() gives it

Files: ``space.py`` (positions, stitch enumeration), ``parts.py`` (an anchor's stem / blocks / tail by family),
``layers.py`` (stitching layers, the plain stitch module), ``net.py`` (:class:`StitchableNet`),
``sampler.py`` (:class:`StitchSampler`), ``surgery.py`` (:class:`Anchors`, the :class:`Stitch` surgery), ``module.py`` (:class:`SNNetModule`, the LightningModule).
"""

from zoo.snnet.layers import (FLOP_MAPPING, ChannelLinear, StitchedViT, StitchPath, StitchingLayer, embed, finish, least_squares, map_block,
                              window_positions)
from zoo.snnet.module import SNNetModule, check_find_unused
from zoo.snnet.net import StitchableNet
from zoo.snnet.sampler import StitchSampler
from zoo.snnet.surgery import Anchors, Stitch, build_anchor

__all__ = [
    "FLOP_MAPPING", "Anchors", "ChannelLinear", "SNNetModule", "Stitch", "StitchPath", "StitchSampler", "StitchableNet", "StitchedViT",
    "StitchingLayer", "build_anchor", "check_find_unused", "embed", "finish", "least_squares", "map_block", "window_positions",
]
