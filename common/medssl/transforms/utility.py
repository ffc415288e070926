"""Small utility transforms for the pretraining pipelines."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medssl.utils.tensors import as_plain_tensor

__all__ = ["PlainTensord"]


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return as_plain_tensor(value)


class PlainTensord(MapTransform):
    """Turn MetaTensors (also inside lists, such as the ``crops`` of :class:`~medssl.transforms.MultiCropd`) into plain
    tensors, dropping their metadata.

    Pretraining batches mix files of different formats (DICOM, NIfTI, PNG) whose metadata dictionaries have different
    keys, which MONAI's collation cannot stack; the views fed to an SSL method need no metadata. Put it last.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _plain(d[key])
        return d


def _is_plain(value: Any) -> bool:  # used by tests
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, torch.Tensor) and not isinstance(value, MetaTensor)
