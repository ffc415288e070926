"""Text in bundle pipelines: a dictionary transform that turns an item's report into fixed-length token ids.

:class:`TokenizeTextd` works in a MONAI ``Compose`` (or alone) on items such as ``{"text": "...", "label": 1}``
from ``datalist_reports.json`` / ``datalist_sentences.json`` or a user's labelled file
(:func:`medssl.text.read_labelled_reports`), adding ``input_ids`` and ``attention_mask`` as int64 tensors of shape
(max_length,) so that the default collate stacks them to (B, 112). It takes a tokenizer folder path (loaded once per
process, on first use, so it pickles small into DataLoader workers) or a :class:`medssl.text.TextTokenizer`::

    {"_target_": "medssl.text.TokenizeTextd", "tokenizer": "@tokenizer_dir"}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .tokenizer import TextTokenizer, load_tokenizer

__all__ = ["TokenizeTextd"]


class TokenizeTextd:
    """``item[key]`` (a string) -> ``item[ids_key]``, ``item[mask_key]`` (int64 tensors (max_length,)).

    Args:
        tokenizer: a tokenizer folder (:func:`medssl.text.load_tokenizer`) or a :class:`TextTokenizer`.
        key: the item's text field.
        ids_key, mask_key: where the ids and the attention mask go.
        max_length: override the tokenizer's length (default: the folder's, 112).
        drop_text: remove ``item[key]`` afterwards (strings do not collate into tensors; MONAI's ``list_data_collate``
            keeps them as a list, which is harmless, so the default keeps it).
    """

    def __init__(
        self,
        tokenizer: str | os.PathLike | TextTokenizer,
        key: str = "text",
        ids_key: str = "input_ids",
        mask_key: str = "attention_mask",
        max_length: int | None = None,
        drop_text: bool = False,
    ) -> None:
        self.key, self.ids_key, self.mask_key = key, ids_key, mask_key
        self.max_length = max_length
        self.drop_text = bool(drop_text)
        if isinstance(tokenizer, TextTokenizer):
            if max_length is not None and int(max_length) != tokenizer.max_length:
                tokenizer = TextTokenizer(tokenizer.tokenizer, max_length=int(max_length), source=tokenizer.source)
            self._folder, self._tokenizer = None, tokenizer
        else:
            self._folder, self._tokenizer = os.fspath(tokenizer), None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._folder, max_length=self.max_length)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._folder is not None:
            state["_tokenizer"] = None  # reloaded from the folder in the worker
        return state

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        item = dict(data)
        if self.key not in item:
            raise KeyError(f"TokenizeTextd: the item has no {self.key!r} field (fields: {', '.join(map(str, item))})")
        text = item[self.key]
        if not isinstance(text, str):
            raise ValueError(f"TokenizeTextd: {self.key!r} must be a string, got {type(text).__name__}")
        batch = self.tokenizer.encode([text])
        item[self.ids_key] = batch["input_ids"][0]
        item[self.mask_key] = batch["attention_mask"][0]
        if self.drop_text:
            del item[self.key]
        return item


def pack_text(input_ids, attention_mask):
    """Ids and attention mask (L,) or (B, L) stacked as one int64 input (2, L) / (B, 2, L), so that text passes through
    MONAI's engines, inferers and bundle checks as a single ``image``-like tensor
    (:class:`medssl.networks.MultiModalClassifier`)."""
    import torch

    return torch.stack((torch.as_tensor(input_ids).long(), torch.as_tensor(attention_mask).long()), dim=-2)
