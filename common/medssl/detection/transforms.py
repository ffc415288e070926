"""Box-aware transforms the detection bundle adds to MONAI's (``monai.apps.detection.transforms.dictionary``:
``StandardizeEmptyBoxd``, ``RandFlipBoxd``, ``RandZoomBoxd``, ``RandCropBoxByPosNegLabeld``, ``ClipBoxToImaged``).

Boxes are ``[x1, y1, x2, y2]`` along the array's spatial axes (medssl 2D arrays are (C, X, Y): x = column).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform

from medssl.utils.tensors import as_plain_tensor

__all__ = ["ResizeBoxd", "BoxesToTensord"]


class BoxesToTensord(MapTransform):
    """The item's ``box_key`` as a float32 (G, 4) tensor and ``label_key`` as an int64 (G,) tensor (a missing or
    empty entry: an image without findings, (0, 4) / (0,))."""

    def __init__(self, box_key: str = "boxes", label_key: str = "labels") -> None:
        super().__init__([box_key, label_key], allow_missing_keys=True)
        self.box_key, self.label_key = box_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        boxes = torch.as_tensor(as_plain_tensor(d.get(self.box_key, [])), dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(as_plain_tensor(d.get(self.label_key, [])), dtype=torch.long).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"{d.get('image', '?')}: {len(boxes)} boxes but {len(labels)} labels")
        d[self.box_key], d[self.label_key] = boxes, labels
        return d


class ResizeBoxd(MapTransform):
    """Resize the image to ``spatial_size`` (bilinear) and scale its boxes with it; the factors (original / new
    size, per axis) go to ``scale_key`` so that predictions can be mapped back to the original pixels
    (``box * scale``). ``spatial_size`` None: nothing resized, scale 1."""

    def __init__(self, image_key: str = "image", box_key: str = "boxes", spatial_size: Sequence[int] | None = None,
                 scale_key: str = "box_scale") -> None:
        super().__init__([image_key, box_key], allow_missing_keys=True)
        self.image_key, self.box_key, self.scale_key = image_key, box_key, scale_key
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = as_plain_tensor(d[self.image_key])
        old = tuple(int(s) for s in image.shape[1:])
        new = self.spatial_size or old
        if len(new) != len(old):
            raise ValueError(f"ResizeBoxd: spatial_size {new} for an image of spatial shape {old}")
        if new != old:
            image = F.interpolate(image[None].float(), size=new, mode="bilinear", align_corners=False)[0]
            d[self.image_key] = image
        factors = torch.tensor([n / o for n, o in zip(new, old)], dtype=torch.float32)
        if self.box_key in d:
            boxes = torch.as_tensor(as_plain_tensor(d[self.box_key]), dtype=torch.float32).reshape(-1, 2 * len(new))
            d[self.box_key] = boxes * factors.repeat(2)
        d[self.scale_key] = (1.0 / factors).tolist()
        return d
