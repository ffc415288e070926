"""Class targets for the hybrid supervised head and the kNN monitors: datalist ``label`` -> one tensor type per item.

The collate-side convention: a long tensor (B,) with the class index of labelled items and ``UNLABELLED`` (-1) for
unlabelled ones, or a float tensor (B, num_classes) of 0/1 targets with rows of -1 for unlabelled items (read by
:class:`medssl.methods.SwAV` and :func:`medssl.losses.supervised_loss`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ClassLabeld", "UNLABELLED"]

UNLABELLED = -1
"""Class target of an item without a class label (ignored by the hybrid head)."""


class ClassLabeld(MapTransform):
    """Datalist ``label`` → class target of the hybrid head (Ghesu et al. 2022, Eq. 7), the same type for every item.

    * single-label (``multi_label=False``): an int (Python / NumPy / 0-d array or tensor) → that class index as a
      0-d long tensor; a str (a segmentation-mask path), None or a missing key → ``UNLABELLED`` (−1);
    * multi-label (``multi_label=True``): a list / 1-D array of ``num_classes`` 0/1 values → a float tensor
      (num_classes,); an int k → the one-hot vector of k; str / None / missing → a vector of −1.

    Put it in the item transforms of SwAV pretraining with ``num_classes > 0`` (after loading, before collation).

    Args:
        keys: the label key(s) ("label").
        num_classes: number of classes; class indices are checked against it (required for ``multi_label``).
        multi_label: produce multi-label vectors.
        allow_missing_keys: accepted for MONAI compatibility; a missing label key always means "unlabelled".

    Raises:
        ValueError: a class index outside [0, num_classes), a vector of the wrong length, a list label without
            ``multi_label`` or a label of another type; the message names the item's image file when known.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        num_classes: int | None = None,
        multi_label: bool = False,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if multi_label and not num_classes:
            raise ValueError("ClassLabeld: multi_label=True needs num_classes")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"ClassLabeld: num_classes={num_classes} must be >= 1")
        self.num_classes = num_classes
        self.multi_label = multi_label

    @staticmethod
    def _where(data: Mapping) -> str:
        image = data.get("image")
        meta = getattr(image, "meta", None)
        if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
            return f"{meta['filename_or_obj']}: "
        if isinstance(image, str):
            return f"{image}: "
        return ""

    def _convert(self, value: Any, key: Hashable, where: str) -> torch.Tensor:
        unlabelled = value is None or isinstance(value, str)
        if self.multi_label:
            if unlabelled:
                return torch.full((self.num_classes,), float(UNLABELLED))
            array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
            if array.ndim == 0 and array.dtype.kind in "iu":
                return F.one_hot(torch.tensor(self._check_index(int(array), key, where)), self.num_classes).float()
            if array.ndim != 1 or array.shape[0] != self.num_classes or array.dtype.kind not in "iufb":
                raise ValueError(
                    f"ClassLabeld: {where}{key!r} = {value!r}: expected a vector of {self.num_classes} 0/1 values, "
                    "a class index, or a mask path / nothing (unlabelled)"
                )
            return torch.as_tensor(array.astype(np.float32))
        if unlabelled:
            return torch.tensor(UNLABELLED, dtype=torch.long)
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if isinstance(value, bool) or array.ndim != 0 or array.dtype.kind not in "iu":
            raise ValueError(
                f"ClassLabeld: {where}{key!r} = {value!r}: expected a class index (int) or a mask path / nothing "
                "(unlabelled); a list is a multi-label vector (multi_label=True)"
            )
        return torch.tensor(self._check_index(int(array), key, where), dtype=torch.long)

    def _check_index(self, index: int, key: Hashable, where: str) -> int:
        if index < 0 or (self.num_classes is not None and index >= self.num_classes):
            upper = self.num_classes if self.num_classes is not None else "num_classes"
            raise ValueError(f"ClassLabeld: {where}{key!r} = {index} is outside [0, {upper})")
        return index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        where = self._where(d)
        for key in self.keys:
            d[key] = self._convert(d.get(key), key, where)
        return d
