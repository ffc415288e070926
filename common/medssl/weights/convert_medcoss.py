"""Convert the published MedCoSS checkpoints (yeerwen/MedCoSS, the pretraining ``Unified_Model``) into the encoder
file of the ``ssl_medcoss_continual_pretrain`` bundle: ``{"state_dict": MultiModalViT state dict, "stage":
"converted", "kind": None, "config": MultiModalViT kwargs}``, the format every stage writes as ``encoder.pt``, so
that :func:`medssl.engines.medcoss_stages.start_encoder` (a stage started from it) and
``medssl.networks.MultiModalViTEmbedder(kind, **saved["config"])`` (embeddings, ``inference.json``) load it; plus a
JSON manifest beside it (source name and sha256, mapped count, the keys that were not converted).

The checkpoint holds the weights under ``"model"`` (a plain state dict and a ``"state_dict"`` entry are read too;
``module.`` prefixes are removed). Key mapping (reference -> medssl), ``{i}`` = 0 .. depth - 1::

    cls_token                                                    cls_token
    token_embed.embeddings.weight                                tokenizers.text.token.weight
    token_embed.embeddings_pos.position_embeddings.weight       tokenizers.text.pos_embed   (+ token type row 0)
    token_embed.embeddings_token_type.weight                    (row 0 folded into the text positions)
    token_embed.embeddings_norm.{weight,bias}                    tokenizers.text.norm.*
    video_embed.embeddings.{weight,bias}                         tokenizers.2d.proj.*         (kernel transposed)
    video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight    tokenizers.2d.pos_embed      (+ temporal row 0)
    video_embed.embeddings_3D.{weight,bias}                      tokenizers.3d.proj.*         (kernel permuted)
    video_embed.embeddings_st_pos_3D.spatial_pos_embed.weight    tokenizers.3d.pos_embed      (+ temporal row 0)
    video_embed.embeddings_st_pos_{2D,3D}.temporal_pos_embed.weight   (row 0 folded into the spatial positions)
    video_embed.embeddings_norm.{weight,bias}                    tokenizers.2d.norm.* and tokenizers.3d.norm.*
    fused_encoder.layers.{i}.self_attn.in_proj_{weight,bias}     encoder.blocks.{i}.attn.qkv.*  (q, k, v stacked)
    fused_encoder.layers.{i}.self_attn.out_proj.*                encoder.blocks.{i}.attn.proj.*
    fused_encoder.layers.{i}.linear1.* / linear2.*               encoder.blocks.{i}.mlp.fc1.* / mlp.fc2.*
    fused_encoder.layers.{i}.norm1.* / norm2.*                   encoder.blocks.{i}.norm1.* / norm2.*
    fused_encoder.layers.{i}.gamma_1 / gamma_2                   encoder.blocks.{i}.ls1 / ls2

What changes in the values:

- The reference adds the token-type embedding's row 0 to every text token, and a temporal position row to every
  image token: in training a random row of 8, in evaluation row 0. Both rows are added to our position tables (the
  evaluation behaviour; the random temporal row of training is dropped). Its one image LayerNorm is copied to both
  our 2D and 3D tokenizers.
- 2D: the reference sees images rows first (C, H, W); medssl's 2D images are column-first (C, W, H). With
  ``transpose_2d=True`` (default) the patch kernel's last two axes and the position grid are transposed, so that the
  converted encoder on a medssl image computes the reference's tokens on the image (``transpose_2d=False`` for data
  loaded rows first).
- 3D: the reference's volumes are (C, D, H, W), depth first, which we take as medssl's (C, X, Y, Z) read backwards
  (D, H, W) = (Z, Y, X), the order of a SimpleITK / nnU-Net array: its 16 x 192 x 192 crop is our (192, 192, 16).
  The kernel (kD, kH, kW) becomes (kW, kH, kD) (``permute(0, 1, 4, 3, 2)``) and the (1, 12, 12) position grid
  (d, h, w) our (12, 12, 1) grid (x, y, z).
- The width, depth, vocabulary, text positions, patch sizes and MLP width are read from the tensors; the attention
  heads are ``dim / 64`` (12 for ViT-B) unless given; the 2D / 3D input sizes (our axis order) must fit the
  position tables (224 and (192, 192, 16) by default).

Everything else in the checkpoint (the MAE decoder, mask token, MLM head, ...) is not encoder: it is listed in the
manifest (``unused_keys``), never silently dropped. A key the encoder needs that the checkpoint lacks, or a tensor of
the wrong shape, is a one-line error naming the file, the key and the shapes.

The published text path uses the authors' 49,411-entry vocabulary: text ids must come from a tokenizer with the same
ids (``--tokenizer_dir``), which the checkpoint does not contain.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import medssl
from medssl.networks.multimodal_vit import MultiModalViT
from medssl.utils.io import atomic_write, atomic_write_text, file_sha256
from medssl.weights.convert_unimiss import load_published_checkpoint
from medssl.weights.export import MANIFEST_FORMAT, _listing, _strip_wrappers, load_encoder_state_dict

__all__ = [
    "convert_medcoss_checkpoint",
    "convert_medcoss_state_dict",
    "medcoss_model_kwargs",
    "medcoss_state_dict",
    "SOURCE_REPOSITORY",
]

logger = logging.getLogger(__name__)

SOURCE_REPOSITORY = "https://github.com/yeerwen/MedCoSS"
HEAD_WIDTH = 64  # ViT-B: 768 / 12

_TEXT = "token_embed."
_IMG = "video_embed."
_LAYERS = "fused_encoder.layers."
_LAYER_KEYS = {  # reference suffix -> ours, inside one layer
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "gamma_1": "ls1",
    "gamma_2": "ls2",
}
_NEEDED = ("cls_token", f"{_TEXT}embeddings.weight", f"{_IMG}embeddings.weight", f"{_IMG}embeddings_3D.weight")


def medcoss_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``Unified_Model`` state dict of a MedCoSS checkpoint (its ``"model"`` entry, a ``"state_dict"`` entry or
    the plain state dict; ``module.`` removed). Another family is a one-line error."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: not a checkpoint dict (a {type(checkpoint).__name__})")
    state = checkpoint
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        entry = next((e for e in ("model", "state_dict") if isinstance(checkpoint.get(e), Mapping)), None)
        if entry is None:
            raise ValueError(
                f"{source}: no MedCoSS model: it holds entries {_listing(sorted(str(k) for k in checkpoint))} and no "
                "'model'; is it another family (tools/convert_weights.py dino / swav / unimiss)?"
            )
        state = checkpoint[entry]
    state = {_strip_wrappers(str(k), ("module.",)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k not in state for k in _NEEDED) or not any(k.startswith(_LAYERS) for k in state):
        found = sorted({k.split(".")[0] for k in state})
        raise ValueError(
            f"{source}: no MedCoSS Unified_Model (cls_token, token_embed.*, video_embed.*, fused_encoder.layers.*): "
            f"its top-level names are {_listing(found) or 'none'}; is it another family (tools/convert_weights.py "
            "dino / swav / unimiss)?"
        )
    return state


def _size(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    size = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != n:
        raise ValueError(f"convert_medcoss: {name} {value!r} must be one int or {n} of them")
    return size


def _plain(size: tuple[int, ...]) -> int | list[int]:
    return size[0] if len(set(size)) == 1 else list(size)


def medcoss_model_kwargs(
    state: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    transpose_2d: bool = True,
    heads: int | None = None,
    img_size_2d: int | Sequence[int] = 224,
    img_size_3d: int | Sequence[int] = (192, 192, 16),
    text_len: int = 112,
) -> dict[str, Any]:
    """``MultiModalViT`` keyword arguments of a reference state dict (see the module docstring); ``img_size_2d`` /
    ``img_size_3d`` are in medssl's axis order and must fit the position tables."""
    dim = int(state["cls_token"].shape[-1])
    if heads is None:
        if dim % HEAD_WIDTH:
            raise ValueError(f"{source}: width {dim} is not a multiple of {HEAD_WIDTH}; give the number of heads")
        heads = dim // HEAD_WIDTH
    depth = 1 + max(int(k[len(_LAYERS):].split(".")[0]) for k in state if k.startswith(_LAYERS))
    fc1 = state.get(f"{_LAYERS}0.linear1.weight")
    hidden = int(fc1.shape[0]) if fc1 is not None else 4 * dim
    vocab = int(state[f"{_TEXT}embeddings.weight"].shape[0])
    pos = state.get(f"{_TEXT}embeddings_pos.position_embeddings.weight")
    positions = int(pos.shape[0]) if pos is not None else 512
    k2, k3 = state[f"{_IMG}embeddings.weight"], state[f"{_IMG}embeddings_3D.weight"]
    if k2.dim() != 4 or k3.dim() != 5:
        raise ValueError(f"{source}: the patch kernels have shapes {tuple(k2.shape)} (2D) and {tuple(k3.shape)} (3D); "
                         f"MedCoSS's are ({dim}, C, p, p) and ({dim}, C, p, p, p)")
    patch_2d = tuple(int(p) for p in k2.shape[2:])
    patch_2d = patch_2d[::-1] if transpose_2d else patch_2d  # (kH, kW) -> our (kX, kY) = (kW, kH)
    patch_3d = tuple(int(p) for p in k3.shape[2:])[::-1]  # (kD, kH, kW) -> our (kX, kY, kZ) = (kW, kH, kD)
    size_2d, size_3d = _size(img_size_2d, 2, "img_size_2d"), _size(img_size_3d, 3, "img_size_3d")
    for name, size, patch in (("img_size_2d", size_2d, patch_2d), ("img_size_3d", size_3d, patch_3d)):
        if any(s % p for s, p in zip(size, patch)):
            raise ValueError(f"{source}: {name} {list(size)} is not a multiple of the checkpoint's patch {list(patch)}")
    return {
        "vocab_size": vocab, "dim": dim, "depth": depth, "heads": int(heads), "mlp_ratio": hidden / dim,
        "layer_scale_init": 1e-3 if f"{_LAYERS}0.gamma_1" in state else None, "drop_path_rate": 0.1,
        "text_len": min(int(text_len), positions), "text_positions": positions,
        "img_size_2d": _plain(size_2d), "patch_2d": _plain(patch_2d), "in_channels_2d": int(k2.shape[1]),
        "img_size_3d": list(size_3d), "patch_3d": _plain(patch_3d), "in_channels_3d": int(k3.shape[1]),
    }


def _reference_shapes(kw: dict[str, Any], transpose_2d: bool) -> dict[str, tuple[int, ...]]:
    """The reference keys the encoder needs, with the shapes a checkpoint of these settings has."""
    dim, hidden = kw["dim"], int(round(kw["mlp_ratio"] * kw["dim"]))
    p2, s2 = _size(kw["patch_2d"], 2, "patch_2d"), _size(kw["img_size_2d"], 2, "img_size_2d")
    p3, s3 = _size(kw["patch_3d"], 3, "patch_3d"), _size(kw["img_size_3d"], 3, "img_size_3d")
    n2, n3 = math.prod(s // p for s, p in zip(s2, p2)), math.prod(s // p for s, p in zip(s3, p3))
    k2 = p2[::-1] if transpose_2d else p2
    shapes = {
        "cls_token": (1, 1, dim),
        f"{_TEXT}embeddings.weight": (kw["vocab_size"], dim),
        f"{_TEXT}embeddings_pos.position_embeddings.weight": (kw["text_positions"], dim),
        f"{_TEXT}embeddings_norm.weight": (dim,), f"{_TEXT}embeddings_norm.bias": (dim,),
        f"{_IMG}embeddings.weight": (dim, kw["in_channels_2d"], *k2), f"{_IMG}embeddings.bias": (dim,),
        f"{_IMG}embeddings_3D.weight": (dim, kw["in_channels_3d"], *p3[::-1]), f"{_IMG}embeddings_3D.bias": (dim,),
        f"{_IMG}embeddings_st_pos_2D.spatial_pos_embed.weight": (n2, dim),
        f"{_IMG}embeddings_st_pos_3D.spatial_pos_embed.weight": (n3, dim),
        f"{_IMG}embeddings_norm.weight": (dim,), f"{_IMG}embeddings_norm.bias": (dim,),
    }
    for i in range(kw["depth"]):
        p = f"{_LAYERS}{i}."
        shapes.update({
            f"{p}self_attn.in_proj_weight": (3 * dim, dim), f"{p}self_attn.in_proj_bias": (3 * dim,),
            f"{p}self_attn.out_proj.weight": (dim, dim), f"{p}self_attn.out_proj.bias": (dim,),
            f"{p}linear1.weight": (hidden, dim), f"{p}linear1.bias": (hidden,),
            f"{p}linear2.weight": (dim, hidden), f"{p}linear2.bias": (dim,),
            f"{p}norm1.weight": (dim,), f"{p}norm1.bias": (dim,), f"{p}norm2.weight": (dim,), f"{p}norm2.bias": (dim,),
        })
        if kw["layer_scale_init"] is not None:
            shapes.update({f"{p}gamma_1": (dim,), f"{p}gamma_2": (dim,)})
    return shapes


def _first_row(state: Mapping[str, torch.Tensor], key: str, dim: int, source: str) -> torch.Tensor:
    """Row 0 of an additive table the reference adds to every token (token type / temporal position); zeros if the
    checkpoint has none."""
    table = state.get(key)
    if table is None:
        return torch.zeros(dim, dtype=state["cls_token"].dtype, device=state["cls_token"].device)
    if table.dim() != 2 or table.shape[1] != dim or table.shape[0] < 1:
        raise ValueError(f"{source}: {key} has shape {tuple(table.shape)}; expected (rows, {dim})")
    return table[0]


def convert_medcoss_state_dict(
    state: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    transpose_2d: bool = True,
    heads: int | None = None,
    img_size_2d: int | Sequence[int] = 224,
    img_size_3d: int | Sequence[int] = (192, 192, 16),
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Map a reference ``Unified_Model`` state dict (already out of its checkpoint, :func:`medcoss_state_dict`) to
    ``MultiModalViT``: ``(converted state dict, MultiModalViT kwargs, sorted keys not converted)``. Works on meta
    tensors too (shapes only)."""
    kw = medcoss_model_kwargs(state, source, transpose_2d, heads, img_size_2d, img_size_3d)
    shapes = _reference_shapes(kw, transpose_2d)
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ValueError(f"{source}: {len(missing)} MedCoSS encoder keys get no tensor: {_listing(missing)}; is it a "
                         "complete MedCoSS checkpoint?")
    wrong = [f"{k}: {tuple(state[k].shape)} where it should be {s}" for k, s in shapes.items()
             if tuple(state[k].shape) != s]
    if wrong:
        raise ValueError(
            f"{source}: {len(wrong)} tensors do not fit a MedCoSS encoder of width {kw['dim']}, img_size_2d "
            f"{kw['img_size_2d']}, img_size_3d {kw['img_size_3d']} (medssl's axis order): {_listing(wrong, '; ')}"
        )
    dim = kw["dim"]
    used = set(shapes)
    out: dict[str, torch.Tensor] = {"cls_token": state["cls_token"]}

    # text: LayerNorm(emb[ids] + pos[arange(L)] + token_type[0])
    type_key = f"{_TEXT}embeddings_token_type.weight"
    out["tokenizers.text.token.weight"] = state[f"{_TEXT}embeddings.weight"]
    text_pos = state[f"{_TEXT}embeddings_pos.position_embeddings.weight"] + _first_row(state, type_key, dim, source)
    out["tokenizers.text.pos_embed"] = text_pos[None]
    out["tokenizers.text.norm.weight"] = state[f"{_TEXT}embeddings_norm.weight"]
    out["tokenizers.text.norm.bias"] = state[f"{_TEXT}embeddings_norm.bias"]
    used.add(type_key)

    # images: LayerNorm(conv(x) tokens + spatial_pos + temporal_pos[0]), one LayerNorm for 2D and 3D
    for kind, conv, pos, grid_of in (("2d", "embeddings", "embeddings_st_pos_2D", _grid_2d),
                                     ("3d", "embeddings_3D", "embeddings_st_pos_3D", _grid_3d)):
        temporal = f"{_IMG}{pos}.temporal_pos_embed.weight"
        table = state[f"{_IMG}{pos}.spatial_pos_embed.weight"] + _first_row(state, temporal, dim, source)
        kernel = state[f"{_IMG}{conv}.weight"]
        if kind == "2d":
            if transpose_2d:
                kernel = kernel.transpose(2, 3)
                table = _transpose_grid(table, grid_of(kw), (1, 0))
        else:
            kernel = kernel.permute(0, 1, 4, 3, 2)
            table = _transpose_grid(table, grid_of(kw), (2, 1, 0))
        out[f"tokenizers.{kind}.proj.weight"] = kernel
        out[f"tokenizers.{kind}.proj.bias"] = state[f"{_IMG}{conv}.bias"]
        out[f"tokenizers.{kind}.pos_embed"] = table[None]
        out[f"tokenizers.{kind}.norm.weight"] = state[f"{_IMG}embeddings_norm.weight"]
        out[f"tokenizers.{kind}.norm.bias"] = state[f"{_IMG}embeddings_norm.bias"]
        used.add(temporal)

    for i in range(kw["depth"]):
        for ref, ours in _LAYER_KEYS.items():
            if f"{_LAYERS}{i}.{ref}" in state and (kw["layer_scale_init"] is not None or not ref.startswith("gamma")):
                out[f"encoder.blocks.{i}.{ours}"] = state[f"{_LAYERS}{i}.{ref}"]
    unused = sorted(k for k in state if k not in used)
    return out, kw, unused


def _grid_2d(kw: dict[str, Any]) -> tuple[int, ...]:
    """The reference's (rows, columns) token grid (transpose_2d=True: our sizes are (X, Y) = (W, H))."""
    size, patch = _size(kw["img_size_2d"], 2, "img_size_2d"), _size(kw["patch_2d"], 2, "patch_2d")
    return tuple(s // p for s, p in zip(size, patch))[::-1]


def _grid_3d(kw: dict[str, Any]) -> tuple[int, ...]:
    """The reference's (d, h, w) token grid of our (X, Y, Z) sizes."""
    size, patch = _size(kw["img_size_3d"], 3, "img_size_3d"), _size(kw["patch_3d"], 3, "patch_3d")
    return tuple(s // p for s, p in zip(size, patch))[::-1]


def _transpose_grid(table: torch.Tensor, grid: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """(N, dim) rows of a row-major ``grid`` -> the rows of the grid with its axes in ``order``, row-major."""
    dim = table.shape[-1]
    return table.reshape(*grid, dim).permute(*order, len(grid)).reshape(-1, dim)


def convert_medcoss_checkpoint(
    checkpoint_path: str | Path,
    out_path: str | Path,
    transpose_2d: bool = True,
    trusted: bool = False,
    heads: int | None = None,
    img_size_2d: int | Sequence[int] = 224,
    img_size_3d: int | Sequence[int] = (192, 192, 16),
) -> tuple[Path, Path, dict[str, Any]]:
    """Convert a published MedCoSS checkpoint (see the module docstring) into a MedCoSS stage encoder file; returns
    (encoder file, manifest, report ``{"mapped": source tensors used, "num_tensors": ours, "config": {...},
    "unused_keys": [...]}``)."""
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"convert_medcoss: out_path {out_path} must be the weights file (e.g. encoder.pt)")
    source = str(checkpoint_path)
    state = medcoss_state_dict(load_published_checkpoint(checkpoint_path, trusted, "convert_medcoss"), source)
    converted, kwargs, unused = convert_medcoss_state_dict(
        state, source, transpose_2d, heads, img_size_2d, img_size_3d
    )
    converted = {k: v.detach().to("cpu").contiguous().clone() for k, v in converted.items()}
    model = MultiModalViT(**kwargs)
    load_encoder_state_dict(model, converted, f"{source} -> MultiModalViT")
    mapped = len(state) - len(unused)  # source tensors that went into the encoder
    saved = {"state_dict": model.state_dict(), "stage": "converted", "kind": None, "config": dict(kwargs)}
    atomic_write(out_path, lambda f: torch.save(saved, f))
    manifest = out_path.with_suffix(".json")
    record = {
        "format": MANIFEST_FORMAT,
        "weights": out_path.name,
        "method": f"MedCoSS (published checkpoint, {SOURCE_REPOSITORY})",
        # the standard encoder manifest: a downstream bundle's --pretrained_path loads it (adapter "multimodal_vit")
        "backbone": {"_target_": "medssl.networks.MultiModalViT", "kwargs": kwargs},
        "feature_dim": kwargs.get("dim", 768),
        "load_with": "medssl.engines.medcoss_stages.start_encoder (as <stage dir>/encoder.pt) or "
        "medssl.networks.MultiModalViTEmbedder(kind, **torch.load(weights)['config'])",
        "layout_2d": "column-first (C, W, H), medssl's 2D layout (transpose_2d=True)" if transpose_2d
        else "rows first (C, H, W), as the reference (transpose_2d=False)",
        "layout_3d": "(C, X, Y, Z) depth last = the reference's (C, D, H, W) read backwards",
        "folded": "token type row 0 into the text positions; temporal position row 0 (the reference's evaluation "
        "behaviour) into the 2D and 3D positions",
        "text_vocabulary": f"{kwargs['vocab_size']} ids of the authors' tokenizer (not in the checkpoint)",
        "source_checkpoint": checkpoint_path.name,
        "source_sha256": file_sha256(checkpoint_path),
        "medssl_version": medssl.__version__,
        "num_mapped": mapped,
        "num_tensors": len(converted),
        "num_source_tensors": len(state),
        "num_encoder_params": sum(p.numel() for p in model.encoder_parameters()),
        "unused_keys": unused,
        "encoder_sha256": file_sha256(out_path),
    }
    atomic_write_text(manifest, json.dumps(record, indent=2) + "\n")
    logger.info(f"convert_medcoss: {mapped} tensors of {source} -> {out_path} ({len(unused)} not encoder)")
    return out_path, manifest, {"mapped": mapped, "num_tensors": len(converted), "config": kwargs,
                                "unused_keys": unused}
