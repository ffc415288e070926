"""RetinaNet on medssl's 2D ResNet backbone, from MONAI's detection app, without torchvision.

- :class:`ResNetFPN`: the feature extractor. ``encoder`` is :class:`medssl.networks.ResNetBackbone` (the trunk the
  pretraining bundles export, so :func:`medssl.weights.load_pretrained_encoder` fills it with
  ``encoder_prefix="feature_extractor.encoder"``), its stage maps (``forward_features(..., pooled=False)``) go through
  MONAI's ``FeaturePyramidNetwork`` (+ ``LastLevelMaxPool``: one more, coarser level). MONAI's ``BackboneWithFPN`` /
  ``resnet_fpn_feature_extractor`` need torchvision (``IntermediateLayerGetter``); this class does not.
- :class:`ResNetRetinaNet`: MONAI's ``RetinaNet`` (classification + box-regression heads shared over the levels) on
  that extractor. ``forward`` returns MONAI's dict of per-level maps; with ``dense_output=True`` it returns one tensor
  ``(B, A * (K + 4), N)`` (the per-level maps, classification channels first, flattened and concatenated over
  levels: N = sum of H_l * W_l) so that MONAI's ``verify_net_in_out`` and the bundle metadata see a tensor.
  The detector always reads the per-level maps (:meth:`ResNetRetinaNet.level_maps`).
- :class:`MiTFPN` / :class:`MiTRetinaNet`: the same on UniMiSS's MiT encoder (2D path, stage maps ``encoder1`` ..
  ``encoder4``), the issue's MiT-through-an-adapter variant (``configs/mit.json``).
- :func:`build_detector`: MONAI's ``RetinaNetDetector`` around it with MONAI's own training components (ATSS
  matcher, hard-negative sampler; the detector's defaults would be torchvision's ``Matcher`` /
  ``BalancedPositiveNegativeSampler``), anchors of ``AnchorGeneratorWithAnchorShape`` and the box selector's
  inference settings.

Axes: MONAI's detection code reads a box ``[x1, y1, x2, y2]`` along the image array's spatial axes in order. medssl's
2D arrays are ``(C, X, Y) = (C, W, H)`` (the column index first, as MONAI's PNG / DICOM readers give them), so a box
in image pixel coordinates (x = column, y = row) is already in array order: x runs along array axis 1, y along axis 2.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from medssl.networks.backbones import ResNetBackbone
from medssl.networks.mit import MIT_VARIANTS, MiT

__all__ = ["ResNetFPN", "ResNetRetinaNet", "MiTFPN", "MiTRetinaNet", "PyramidRetinaNet", "MedsslRetinaNetDetector",
           "build_detector", "ENCODER_PREFIX", "DEFAULT_LEVELS", "MIT_LEVELS"]

#: where the pretrained encoder sits in :class:`ResNetRetinaNet` (``load_pretrained_encoder``'s ``encoder_prefix``)
ENCODER_PREFIX = "feature_extractor.encoder"
#: the ResNet stage maps the pyramid is built on (strides 4, 8, 16, 32; the extra max-pool level has stride 64)
DEFAULT_LEVELS = ("layer1", "layer2", "layer3", "layer4")
_LEVEL_STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
#: the MiT encoder stage maps the pyramid is built on (strides 4, 8, 16, 32)
MIT_LEVELS = ("encoder1", "encoder2", "encoder3", "encoder4")
_MIT_STRIDES = {"encoder1": 4, "encoder2": 8, "encoder3": 16, "encoder4": 32}


def _match_channels(x: torch.Tensor, channels: int, owner: str) -> torch.Tensor:
    """Grey inputs repeated to the encoder's channels (an RGB-pretrained trunk); other mismatches are errors."""
    if x.dim() != 4:
        raise ValueError(f"{owner}: input of shape {tuple(x.shape)}; expected (B, C, X, Y)")
    if x.shape[1] == channels:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"{owner}: input with {x.shape[1]} channels; expected {channels} (or 1)")
    return x.expand(-1, channels, *x.shape[2:])


class ResNetFPN(nn.Module):
    """ResNet stage maps + MONAI's feature pyramid: ``(B, C, X, Y) -> {level: (B, fpn_channels, X / s, Y / s)}``,
    finest level first, one extra max-pooled level last.

    Args:
        in_channels: channels of the images given (1: grey); repeated to ``encoder_in_channels`` when the encoder
            was pretrained on more (e.g. 3 for an RGB trunk).
        encoder_in_channels: the encoder's input channels (default ``in_channels``).
        layers, block, width, block_inplanes, bias_downsample: :class:`medssl.networks.ResNetBackbone` arguments
            (default: the ResNet-50 the pretraining bundles export).
        levels: the stage maps the pyramid uses, fine to coarse (default ``layer1`` .. ``layer4``). Every stage up to
            the deepest one runs; stages after it would get no gradient, so the default uses all four.
        fpn_channels: channels of every pyramid level (the heads' width).
    """

    def __init__(
        self,
        in_channels: int = 1,
        encoder_in_channels: int | None = None,
        layers: Sequence[int] = (3, 4, 6, 3),
        block: str = "bottleneck",
        width: float = 1,
        block_inplanes: Sequence[int] = (64, 128, 256, 512),
        bias_downsample: bool = False,
        levels: Sequence[str] = DEFAULT_LEVELS,
        fpn_channels: int = 256,
    ) -> None:
        super().__init__()
        levels = tuple(levels)
        unknown = [name for name in levels if name not in _LEVEL_STRIDES]
        if not levels or unknown:
            raise ValueError(f"ResNetFPN: levels={levels}; expected a non-empty subset of {tuple(_LEVEL_STRIDES)}")
        self.in_channels = int(in_channels)
        self.encoder = ResNetBackbone(
            spatial_dims=2,
            in_channels=self.in_channels if encoder_in_channels is None else int(encoder_in_channels),
            layers=layers,
            block=block,
            width=width,
            block_inplanes=block_inplanes,
            bias_downsample=bias_downsample,
        )
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2,
            in_channels_list=[self.encoder.level_dims[name] for name in levels],
            out_channels=int(fpn_channels),
            extra_blocks=LastLevelMaxPool(2),
        )
        self.out_channels = int(fpn_channels)  # what MONAI's RetinaNet reads
        #: stride of each output level (the extra max-pooled level last)
        self.strides = tuple(_LEVEL_STRIDES[name] for name in levels) + (2 * _LEVEL_STRIDES[levels[-1]],)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _match_channels(x, self.encoder.in_channels, "ResNetFPN")
        features = self.encoder.forward_features(x, levels=self.levels, pooled=False)
        return self.fpn(OrderedDict((name, features[name]) for name in self.levels))


class MiTFPN(nn.Module):
    """UniMiSS's MiT encoder (2D path, no decoder) + MONAI's feature pyramid: the adapter of the issue's MiT variant.
    ``(B, C, X, Y) -> {level: (B, fpn_channels, X / s, Y / s)}`` for the encoder stage maps ``encoder1`` ..
    ``encoder4`` (strides 4-32) and one extra max-pooled level (stride 64).

    Args:
        in_channels: channels of the images given (1: grey; repeated to ``mit_in_channels``).
        variant: ``"tiny"`` or ``"small"`` (``medssl.networks.MIT_VARIANTS``).
        img_size: the 2D size the position embeddings are sized for (224: UniMiSS's 2D pretraining, so an exported
            encoder's embeddings load with their shapes; other input sizes resample them).
        mit_in_channels: the MiT 2D path's input channels (3 in UniMiSS).
        levels: the encoder maps the pyramid uses (default all four).
        fpn_channels: channels of every pyramid level.
        mit_kwargs: more :class:`medssl.networks.MiT` arguments (``dims``, ``num_heads``, ...).

    Every MiT parameter gets a gradient from the pyramid (the SSL token takes part in the stages' attention), so
    DistributedDataParallel needs no ``find_unused_parameters``.
    """

    def __init__(self, in_channels: int = 1, variant: str = "small", img_size: int | Sequence[int] = 224,
                 mit_in_channels: int = 3, levels: Sequence[str] = MIT_LEVELS, fpn_channels: int = 256,
                 **mit_kwargs) -> None:
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"MiTFPN: unknown variant {variant!r}; known: {sorted(MIT_VARIANTS)}")
        levels = tuple(levels)
        if not levels or any(name not in _MIT_STRIDES for name in levels):
            raise ValueError(f"MiTFPN: levels={levels}; expected a non-empty subset of {MIT_LEVELS}")
        config = dict(MIT_VARIANTS[variant])
        config.update(mit_kwargs)
        config.update(in_channels_2d=int(mit_in_channels), img_size_2d=img_size)
        self.in_channels = int(in_channels)
        self.mit_in_channels = int(mit_in_channels)
        self.encoder = MiT(spatial_dims=2, decoder=False, **config)
        dims = list(config.get("dims", (48, 128, 256, 512)))
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=2,
            in_channels_list=[dims[MIT_LEVELS.index(name)] for name in levels],
            out_channels=int(fpn_channels),
            extra_blocks=LastLevelMaxPool(2),
        )
        self.out_channels = int(fpn_channels)
        self.strides = tuple(_MIT_STRIDES[name] for name in levels) + (2 * _MIT_STRIDES[levels[-1]],)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _match_channels(x, self.mit_in_channels, "MiTFPN")
        features = self.encoder.forward_features(x, decode=False)
        return self.fpn(OrderedDict((name, features[name]) for name in self.levels))


class PyramidRetinaNet(RetinaNet):
    """MONAI's 2D ``RetinaNet`` on a pyramid feature extractor (:class:`ResNetFPN`, :class:`MiTFPN`: ``encoder``,
    ``out_channels``, ``strides``).

    Args:
        feature_extractor: the extractor.
        num_classes: lesion classes K (no background class: RetinaNet scores each class with a sigmoid).
        num_anchors: anchors per location A (``len(base_anchor_shapes)`` of the detector's anchor generator).
        dense_output: ``forward`` returns one tensor ``(B, A * (K + 4), N)`` instead of MONAI's dict of per-level maps
            (module docstring); the detector reads the maps either way.

    Inputs ``(B, C, X, Y)`` with X and Y multiples of ``size_divisible`` (2 x the coarsest stride, 64 by default; the
    detector pads other sizes).
    """

    def __init__(self, feature_extractor: nn.Module, num_classes: int, num_anchors: int = 3,
                 dense_output: bool = False) -> None:
        super().__init__(
            spatial_dims=2,
            num_classes=int(num_classes),
            num_anchors=int(num_anchors),
            feature_extractor=feature_extractor,
            size_divisible=feature_extractor.strides[-1],
        )
        self.dense_output = bool(dense_output)

    @property
    def encoder(self) -> nn.Module:
        """The pretrained trunk (``feature_extractor.encoder``)."""
        return self.feature_extractor.encoder

    @contextlib.contextmanager
    def level_maps(self) -> Iterator["PyramidRetinaNet"]:
        """Within the block ``forward`` returns MONAI's dict of per-level maps (what ``RetinaNetDetector`` reads)."""
        previous, self.dense_output = self.dense_output, False
        try:
            yield self
        finally:
            self.dense_output = previous

    def forward(self, images: torch.Tensor):
        out = super().forward(images)
        if not self.dense_output:
            return out
        parts = [
            torch.cat([cls, box], dim=1).flatten(2) for cls, box in zip(out[self.cls_key], out[self.box_reg_key])
        ]
        return torch.cat(parts, dim=2)


class ResNetRetinaNet(PyramidRetinaNet):
    """:class:`PyramidRetinaNet` on :class:`ResNetFPN` (the default network of the bundle).

    Args:
        num_classes, num_anchors, dense_output: as :class:`PyramidRetinaNet`.
        kwargs: :class:`ResNetFPN` arguments (``in_channels``, ``layers``, ``block_inplanes``, ``width``, ``levels``,
            ``fpn_channels``, ...).
    """

    def __init__(self, num_classes: int, num_anchors: int = 3, dense_output: bool = False, **kwargs) -> None:
        super().__init__(ResNetFPN(**kwargs), num_classes, num_anchors, dense_output)


class MiTRetinaNet(PyramidRetinaNet):
    """:class:`PyramidRetinaNet` on :class:`MiTFPN` (``configs/mit.json``: UniMiSS's MiT through the pyramid adapter).

    Args:
        num_classes, num_anchors, dense_output: as :class:`PyramidRetinaNet`.
        kwargs: :class:`MiTFPN` arguments (``in_channels``, ``variant``, ``img_size``, ``dims``, ``fpn_channels``, ...).
    """

    def __init__(self, num_classes: int, num_anchors: int = 3, dense_output: bool = False, **kwargs) -> None:
        super().__init__(MiTFPN(**kwargs), num_classes, num_anchors, dense_output)


class MedsslRetinaNetDetector(RetinaNetDetector):
    """MONAI's ``RetinaNetDetector`` with two changes: the network's per-level maps are read even when it is built
    with ``dense_output=True``, and anchors are matched by MONAI's ATSS matcher only (MONAI's own
    ``compute_anchor_matched_idxs`` first tests for torchvision's ``Matcher``, which fails without torchvision)."""

    def compute_anchor_matched_idxs(self, anchors, targets, num_anchor_locs_per_level):
        """Per image, the matched ground-truth index of every anchor (-1: background), by the ATSS matcher."""
        if not isinstance(getattr(self, "proposal_matcher", None), ATSSMatcher):
            raise ValueError("MedsslRetinaNetDetector: set the matcher with set_atss_matcher (torchvision's Matcher "
                             "is not supported)")
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            boxes = target[self.target_box_key].to(anchors_per_image.device)
            if boxes.numel() == 0:  # an image without findings: every anchor is background
                matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
                continue
            _, idxs = self.proposal_matcher(boxes, anchors_per_image, num_anchor_locs_per_level,
                                            self.num_anchors_per_loc)
            matched.append(idxs)
        return matched

    def forward(self, input_images, targets=None, use_inferer: bool = False):
        maps = self.network.level_maps() if hasattr(self.network, "level_maps") else contextlib.nullcontext()
        with maps:
            return super().forward(input_images, targets, use_inferer=use_inferer)


def build_detector(
    network: nn.Module,
    base_anchor_shapes: Sequence[Sequence[float]] = ((8, 8), (12, 12), (16, 16)),
    *,
    atss_candidates: int = 4,
    center_in_gt: bool = False,
    sampler_batch_size: int = 64,
    positive_fraction: float = 0.3,
    hard_negative_pool: float = 20,
    score_thresh: float = 0.02,
    topk_candidates_per_level: int = 1000,
    nms_thresh: float = 0.22,
    detections_per_img: int = 100,
) -> MedsslRetinaNetDetector:
    """MONAI's ``RetinaNetDetector`` around ``network`` (a :class:`ResNetRetinaNet`), ready to train and predict
    without torchvision.

    Anchors: ``AnchorGeneratorWithAnchorShape`` with ``base_anchor_shapes`` (width, height in pixels at the finest
    level) scaled by each level's stride relative to the finest one. Training: ATSS matcher (``atss_candidates``
    per level, ``center_in_gt``) and hard-negative sampling (``sampler_batch_size`` anchors per image,
    ``positive_fraction``, negatives drawn from the ``hard_negative_pool`` x as many highest-scored ones).
    Inference: box selector (score threshold, top-k per level, NMS IoU, detections per image).
    """
    strides = getattr(getattr(network, "feature_extractor", None), "strides", None)
    if strides is None:
        raise ValueError(f"build_detector: {type(network).__name__} has no feature_extractor.strides (use "
                         "medssl.detection.ResNetRetinaNet or MiTRetinaNet)")
    scales = tuple(s // strides[0] for s in strides)
    shapes = tuple(tuple(float(v) for v in shape) for shape in base_anchor_shapes)
    if any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"build_detector: base_anchor_shapes={base_anchor_shapes}; expected (width, height) pairs")
    if len(shapes) != network.num_anchors:
        raise ValueError(f"build_detector: {len(shapes)} base anchor shapes for a network with "
                         f"num_anchors={network.num_anchors}")
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=scales, base_anchor_shapes=shapes)
    detector = MedsslRetinaNetDetector(network, anchors)
    detector.set_atss_matcher(num_candidates=int(atss_candidates), center_in_gt=bool(center_in_gt))
    detector.set_hard_negative_sampler(
        batch_size_per_image=int(sampler_batch_size), positive_fraction=float(positive_fraction),
        pool_size=float(hard_negative_pool),
    )
    detector.set_target_keys(box_key="boxes", label_key="labels")
    detector.set_box_selector_parameters(
        score_thresh=float(score_thresh), topk_candidates_per_level=int(topk_candidates_per_level),
        nms_thresh=float(nms_thresh), detections_per_img=int(detections_per_img),
    )
    return detector
