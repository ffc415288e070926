"""How the authors' MiT checkpoints (YtongXie/UniMiSS-code) and :class:`medssl.networks.mit.MiT` name and lay out
the same weights: the key mapping in both directions (:func:`medssl_key`, :func:`reference_key`) and the axis-order
changes of the per-dimension kernels and position embeddings (:func:`reference_state_dict_shapes`). The converter
that applies them: :mod:`medssl.weights.convert_unimiss`."""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medssl.networks.mit import MiT

__all__ = ["medssl_key", "reference_key", "reference_state_dict_shapes"]

# --------------------------------------------------------------------------------------------- key mapping
_BLOCK_PARTS = r"(?:norm1|norm2|attn\.q|attn\.kv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
_FIELDS = {
    "d": r"[23]",
    "i": r"\d+",
    "j": r"\d+",
    "p": r"(?:weight|bias)",
    "cn": r"(?:conv\.weight|norm\.weight|norm\.bias)",
    "part": _BLOCK_PARTS,
}


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    """``"transformer.block{i}.{j}.{part}"`` -> an anchored regex with one named group per field."""
    pattern, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[pos : m.start()]) + f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile(pattern + re.escape(template[pos:]) + r"\Z")


@dataclass(frozen=True)
class _Rule:
    """One key pattern on each side; ``{i}`` of the reference = ``{i}`` of medssl + ``offset``."""

    reference: str
    medssl: str
    offset: int = 0

    def convert(self, key: str, to_medssl: bool) -> str | None:
        source, target = (self.reference, self.medssl) if to_medssl else (self.medssl, self.reference)
        match = _template_regex(source).match(key)
        if match is None:
            return None
        groups = match.groupdict()
        if "i" in groups:
            shift = -self.offset if to_medssl else self.offset
            index = int(groups["i"]) + shift
            if index < 0:
                return None
            groups["i"] = str(index)
        return target.format(**groups)


def _block_rules(reference_prefix: str, medssl_prefix: str, offset: int) -> list[_Rule]:
    ref, ours = reference_prefix + "{i}.{j}.", medssl_prefix + ".{i}.{j}."
    return [
        _Rule(ref + "attn.sr{d}D.{p}", ours + "attn.sr.{d}d.{p}", offset),
        _Rule(ref + "attn.norm.{p}", ours + "attn.sr_norm.{p}", offset),
        _Rule(ref + "{part}", ours + "{part}", offset),
    ]


_RULES: list[_Rule] = [
    _Rule("transformer.patch_embed{d}D0.{cn}", "encoder.stem.{d}d.{cn}"),
    _Rule("transformer.patch_embed{d}D{i}.proj.{cn}", "encoder.patch_embed.{d}d.{i}.{cn}", offset=1),
    _Rule("transformer.pos_embed{d}D{i}", "encoder.pos_embed.{d}d.{i}", offset=1),
    _Rule("transformer.cls_tokens1", "encoder.ssl_token"),
    _Rule("transformer.cls_tokens{i}.{p}", "encoder.ssl_token_proj.{i}.{p}", offset=2),
    *_block_rules("transformer.block", "encoder.stages", offset=1),
    _Rule("DecEmbed{d}D{i}.proj.{p}", "decoder.upsample.{d}d.{i}.{p}"),
    _Rule("DecPosEmbed{d}D{i}", "decoder.pos_embed.{d}d.{i}"),
    _Rule("cls_tokens{i}.{p}", "decoder.ssl_token_proj.{i}.{p}"),
    *_block_rules("Decblock", "decoder.stages", offset=0),
    _Rule("norm.{p}", "decoder.norm.{p}"),
]


def medssl_key(reference_key: str) -> str | None:
    """The :class:`MiT` state-dict key of a reference MiT key (``backbone.`` already stripped), None if unknown."""
    for rule in _RULES:
        key = rule.convert(reference_key, to_medssl=True)
        if key is not None:
            return key
    return None


def reference_key(medssl_key: str) -> str | None:
    """The reference MiT key of a :class:`MiT` state-dict key, None if it has none."""
    for rule in _RULES:
        key = rule.convert(medssl_key, to_medssl=False)
        if key is not None:
            return key
    return None


def _reference_path(key: str) -> int | None:
    """2 / 3 for a reference key of a per-dimension module (``...2D...`` / ``...3D...``), None for shared ones."""
    match = re.search(r"(?:patch_embed|pos_embed|sr|DecEmbed|DecPosEmbed)([23])D", key)
    return int(match.group(1)) if match else None


def _is_reference_decoder_key(key: str) -> bool:
    return not key.startswith("transformer.")


# --------------------------------------------------------------------------------------------- axis order
def _position_grid(model: MiT, medssl_key: str) -> tuple[int, ...]:
    """The (medssl-order) token grid of a position embedding of ``model``."""
    part, _, d, index = medssl_key.split(".")
    module = model.encoder if part == "encoder" else model.decoder
    return tuple(module.pos_grids[int(d[0])][int(index)])


def _axis_change(model: MiT, medssl_key: str, shape: Sequence[int], transpose_2d: bool):
    """How a reference tensor becomes the medssl tensor of ``medssl_key``: ``(to_medssl, to_reference, note)`` (two
    callables on tensors, a short description), or None when the values are taken as they are."""
    path = model.path_of(medssl_key)
    if path is None or (path == 2 and not transpose_2d):
        return None
    if ".pos_embed." in medssl_key:
        grid = _position_grid(model, medssl_key)  # medssl order: 2D (W, H) of the reference, 3D (X, Y, Z) = (H, W, D)
        channels = shape[-1]
        if path == 3:
            ref_grid = (grid[2], grid[0], grid[1])  # (D, H, W)
            forward_perm, backward_perm = (0, 2, 3, 1, 4), (0, 3, 1, 2, 4)
            note = "3D position grid (D, H, W) -> (H, W, D) = (X, Y, Z)"
        else:
            ref_grid = (grid[1], grid[0])
            forward_perm = backward_perm = (0, 2, 1, 3)
            note = "2D position grid (H, W) -> (W, H)"

        def move(tensor: torch.Tensor, source_grid, perm) -> torch.Tensor:
            patches = tensor[:, 1:].reshape(tensor.shape[0], *source_grid, channels).permute(*perm)
            return torch.cat((tensor[:, :1], patches.reshape(tensor.shape[0], -1, channels)), dim=1)

        return (
            lambda t: move(t, ref_grid, forward_perm),
            lambda t: move(t, grid, backward_perm),
            note,
        )
    if len(shape) == 5 and path == 3:
        return (
            lambda t: t.permute(0, 1, 3, 4, 2),
            lambda t: t.permute(0, 1, 4, 2, 3),
            "3D kernel (kD, kH, kW) -> (kH, kW, kD)",
        )
    if len(shape) == 4 and path == 2:
        return (lambda t: t.transpose(2, 3), lambda t: t.transpose(2, 3), "2D kernel (kH, kW) -> (kW, kH)")
    return None


def _reference_shape(model: MiT, key: str, tensor: torch.Tensor, transpose_2d: bool) -> tuple[int, ...]:
    change = _axis_change(model, key, tuple(tensor.shape), transpose_2d)
    if change is None:
        return tuple(tensor.shape)
    return tuple(change[1](torch.empty(tensor.shape, device="meta")).shape)


def reference_state_dict_shapes(model: MiT, transpose_2d: bool = True) -> "OrderedDict[str, tuple[int, ...]]":
    """The reference key names and shapes (in the reference's axis order) of a checkpoint that converts into
    ``model``: what ``model`` expects to find in the authors' checkpoint (e.g. ``UniMiss_small`` for
    ``mit_small()``)."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for key, tensor in model.state_dict().items():
        ref = reference_key(key)
        if ref is None:
            raise KeyError(f"reference_state_dict_shapes: MiT key {key!r} has no reference counterpart")
        shapes[ref] = _reference_shape(model, key, tensor, transpose_2d)
    return shapes
