"""Converter from the published UniMiSS checkpoints (YtongXie/UniMiSS-code) to :class:`medssl.networks.mit.MiT`.

The authors' checkpoints (``UniMiss_tiny`` / ``UniMiss_small``) are ``torch.save`` dicts of their training state:
``{"teacher": {"backbone.<MiT key>": ..., "head.<DINO head key>": ...}, "student": {"module.backbone.<MiT key>": ...,
"module.head.<...>": ...}, "optimizer": ..., "epoch": int, "args": argparse.Namespace, "loss": {...}}``. Their MiT
keys (:func:`reference_state_dict_shapes` lists them) are: the encoder under ``transformer.`` (``patch_embed2D0`` stem,
``patch_embed2D1..4.proj``, ``pos_embed2D1..4``, ``cls_tokens1`` + Linear ``cls_tokens2..4``, ``block1..4``; the
same with ``3D``), the decoder at the top level (``DecEmbed2D0..2.proj``, ``DecPosEmbed2D0..2``, ``Decblock0..2``,
``cls_tokens0..2``, ``norm``).

Key mapping (reference → medssl), ``{d}`` = 2 or 3, stage indices shifted to start at 0::

    transformer.patch_embed{d}D0.{conv,norm}.*           encoder.stem.{d}d.{conv,norm}.*
    transformer.patch_embed{d}D{i}.proj.{conv,norm}.*    encoder.patch_embed.{d}d.{i-1}.{conv,norm}.*
    transformer.pos_embed{d}D{i}                         encoder.pos_embed.{d}d.{i-1}
    transformer.cls_tokens1                              encoder.ssl_token
    transformer.cls_tokens{i}.*  (i >= 2)                encoder.ssl_token_proj.{i-2}.*
    transformer.block{i}.{j}.attn.sr{d}D.*               encoder.stages.{i-1}.{j}.attn.sr.{d}d.*
    transformer.block{i}.{j}.attn.norm.*                 encoder.stages.{i-1}.{j}.attn.sr_norm.*
    transformer.block{i}.{j}.{norm1,norm2,attn.q,attn.kv,attn.proj,mlp.fc1,mlp.fc2}.*   encoder.stages.{i-1}.{j}.(same)
    DecEmbed{d}D{i}.proj.*                               decoder.upsample.{d}d.{i}.*
    DecPosEmbed{d}D{i}                                   decoder.pos_embed.{d}d.{i}
    cls_tokens{i}.*                                      decoder.ssl_token_proj.{i}.*
    Decblock{i}.{j}.(as the encoder's blocks)            decoder.stages.{i}.{j}.(as the encoder's blocks)
    norm.*                                               decoder.norm.*

Axis order (the values, not only the names, change):

- 3D: the reference trains on crops ``(C, D, H, W)`` = nibabel's voxel array ``(X, Y, Z)`` transposed to
  ``(Z, X, Y)`` (``data_loader3D.py``: ``image.transpose((0, 3, 1, 2))``); medssl volumes are ``(C, X, Y, Z)`` with
  the depth last. Every 3D kernel (stem / stage convs, spatial-reduction convs, decoder ConvTranspose3d) is therefore
  permuted from (kD, kH, kW) to (kH, kW, kD) (``w.permute(0, 1, 3, 4, 2)``), and the patch part of every 3D position
  embedding from the (D, H, W) token grid to the (H, W, D) = (X, Y, Z) grid. The 3D stem's stride (1, 2, 2) is
  (2, 2, 1) in MiT.
- 2D: the reference reads images with OpenCV (rows first, ``(C, H, W)``); medssl's readers (MONAI's, reverse
  indexing) give 2D images column-index first. With ``transpose_2d=True`` (default) the 2D kernels and 2D position
  grids are transposed (H, W) → (W, H) so that the converted network sees an image as the authors' did; pass
  ``transpose_2d=False`` for 2D data loaded rows first.

Nothing else changes in the weights (the layers are the same, the parameter counts equal the reference's). At other
input sizes than the pretraining ones the position embeddings are resized as the authors' code resizes them
(:func:`medssl.networks.mit.resample_position_embedding`: each axis scaled by (target + 0.1) / source, bicubic in
2D, trilinear in 3D), so a converted encoder computes the authors' features at fine-tuning sizes too
(``tests/test_mit.py`` checks the resize against a stored reference at 96², 256² and 16×128×128). A key the mapping does
not know, a key of a part that is not converted (the DINO head, the decoder with ``decoder=False``, the other path
with one ``spatial_dims``) is reported, never silently dropped; a MiT key that gets no tensor, and any shape that
does not fit, is an error naming the key and both shapes.

Output: ``encoder.pt`` (plain state dict of the MiT, loadable with ``weights_only=True``) + ``encoder.json``, the
manifest of :mod:`medssl.weights.export` (format ``medssl-encoder/1``; its ``backbone`` is
``medssl.networks.mit.mit_small`` / ``mit_tiny`` with the kwargs used), plus a ``conversion`` record (source entry,
permutations, unused keys). Rebuild with ``medssl.weights.export.build_encoder_from_manifest("encoder.json")``.

Checkpoints are read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, the ``args`` entry, allowed);
``trusted=True`` falls back to full unpickling for files you trust.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import medssl
from medssl.networks.mit import MIT_VARIANTS, MiT, mit_small, mit_tiny
from medssl.utils.io import file_sha256
from medssl.weights.export import (
    MANIFEST_FORMAT,
    _listing,
    load_encoder_state_dict,
    write_encoder_files,
)
from medssl.weights.unimiss_keys import (
    _axis_change,
    _is_reference_decoder_key,
    _reference_path,
    _reference_shape,
    medssl_key,
    reference_key,
    reference_state_dict_shapes,
)

__all__ = [
    "ConversionReport",
    "convert_unimiss_checkpoint",
    "convert_unimiss_state_dict",
    "infer_variant",
    "load_published_checkpoint",
    "load_unimiss_checkpoint",
    "medssl_key",
    "reference_key",
    "reference_state_dict_shapes",
    "select_backbone_state_dict",
    "UNIMISS_PREPROCESSING",
]

logger = logging.getLogger(__name__)

SOURCE_REPOSITORY = "YtongXie/UniMiSS-code"
DEFAULT_IMG_SIZE_2D = 224
DEFAULT_IMG_SIZE_3D = (96, 96, 16)  # (X, Y, Z) = the reference's 16 × 96 × 96 (D, H, W) crops

# how the authors prepared their inputs (main.py, data_loader2D.py, data_loader3D.py of YtongXie/UniMiSS-code)
UNIMISS_PREPROCESSING: dict[str, Any] = {
    "2d": {
        "channels": 3,
        "description": "RGB (grey images as 3 equal channels), intensities / 255 to [0, 1] (torchvision ToTensor), "
        "no mean / std normalisation; pretraining crops 224 x 224",
        "size": [224, 224],
    },
    "3d": {
        "channels": 1,
        "description": "CT in HU divided by 1024 (no clipping); about 1 x 1 x 3 mm voxels; pretraining crops of "
        "96 x 96 x 16 (X, Y, Z), depth last (the reference's 16 x 96 x 96 D x H x W)",
        "size": [96, 96, 16],
        "spacing_mm": [1.0, 1.0, 3.0],
    },
}

# --------------------------------------------------------------------------------------------- report
@dataclass
class ConversionReport:
    """What a conversion did. ``mapped``: reference key → MiT key; ``axis_changes``: MiT key → what was permuted;
    ``unused``: reference keys not converted, by reason (``"head"``: the DINO head, ``"decoder"``: decoder keys with
    ``decoder=False``, ``"path 2D"`` / ``"path 3D"``: a path that is not built, ``"unknown"``: keys the mapping does
    not know, ``"other"``: entries outside ``backbone.`` and ``head.``); ``missing``: MiT keys that got no tensor
    (always empty in a returned report: a missing key is an error)."""

    source: str
    entry: str
    variant: str
    spatial_dims: tuple[int, ...]
    decoder: bool
    transpose_2d: bool
    mapped: dict[str, str] = field(default_factory=dict)
    axis_changes: dict[str, str] = field(default_factory=dict)
    unused: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def unused_keys(self) -> list[str]:
        return [key for keys in self.unused.values() for key in keys]

    def summary(self, full: bool = True) -> str:
        """A human-readable account: counts, then every unused / missing key (``full=False``: the first few)."""
        paths = "+".join(f"{d}D" for d in self.spatial_dims)
        parts = "encoder + decoder" if self.decoder else "encoder"
        lines = [
            f"{self.source} [{self.entry}]: MiT-{self.variant} ({paths}, {parts})",
            f"  mapped {len(self.mapped)} tensors; axis order changed on {len(self.axis_changes)} "
            f"(3D: (D, H, W) -> (X, Y, Z) = (H, W, D){'; 2D transposed' if self.transpose_2d else ''})",
        ]
        for reason, keys in self.unused.items():
            shown = keys if full else keys[:8]
            lines.append(f"  not converted ({reason}): {len(keys)} keys")
            lines += [f"    {k}" for k in shown]
            if len(shown) < len(keys):
                lines.append(f"    ... ({len(keys) - len(shown)} more)")
        if self.missing:
            lines.append(f"  MiT keys without a source tensor: {len(self.missing)}")
            lines += [f"    {k}" for k in self.missing]
        else:
            lines.append("  every MiT key received a tensor")
        return "\n".join(lines)

    def as_manifest_record(self) -> dict[str, Any]:
        return {
            "converter": "medssl.weights.convert_unimiss",
            "source_repository": SOURCE_REPOSITORY,
            "source_entry": self.entry,
            "transpose_2d": self.transpose_2d,
            "axis_order": "3D kernels and position grids permuted from the reference's (D, H, W) to (X, Y, Z) = "
            "(H, W, D)" + ("; 2D ones transposed (H, W) -> (W, H)" if self.transpose_2d else "; 2D ones unchanged"),
            "num_mapped": len(self.mapped),
            "num_axis_changes": len(self.axis_changes),
            "unused_source_keys": {reason: list(keys) for reason, keys in self.unused.items()},
        }


# --------------------------------------------------------------------------------------------- reading
def load_unimiss_checkpoint(path: str | Path, trusted: bool = False) -> Any:
    """``torch.load`` of an authors' checkpoint on CPU (:func:`load_published_checkpoint`)."""
    return load_published_checkpoint(path, trusted, owner="convert_unimiss")


def load_published_checkpoint(path: str | Path, trusted: bool = False, owner: str = "convert_weights") -> Any:
    """``torch.load`` of a published checkpoint on CPU, ``weights_only=True`` with ``argparse.Namespace`` (an
    ``args`` entry) allowed; ``trusted=True`` retries with full unpickling when that fails. An empty, text,
    truncated or corrupt file gets a one-line ``ValueError`` starting with ``owner`` (the converter's name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: {path}: no such checkpoint file")
    problem = _not_a_checkpoint(path)
    if problem:
        raise ValueError(f"{owner}: {path} {problem}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # memory-mapped: the optimiser state and the student are never copied into memory
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) torch.save file
    except Exception as e:  # noqa: BLE001 - pickle errors of every kind end here
        if not _refused_by_weights_only(e):  # unreadable as such: --trusted would not help
            raise ValueError(
                f"{owner}: {path} is truncated or corrupt ({type(e).__name__}: {_last_line(e) or 'no message'}); "
                "download it again"
            ) from e
        if not trusted:
            raise ValueError(
                f"{owner}: {path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                f"{_last_line(e)}); if you trust the file, pass trusted=True (--trusted)"
            ) from e
        reason = _last_line(e)
        logger.warning(f"{owner}: {path}: weights_only load failed ({reason}); unpickling fully (trusted=True)")
        return torch.load(path, map_location="cpu", weights_only=False)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format
_PICKLE_PROTOCOLS = {bytes([0x80, n]) for n in range(2, 6)}  # a legacy torch.save file starts with a pickle opcode


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, from its first bytes (None when it may be one)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "is empty (0 bytes): not a checkpoint"
    if head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_PROTOCOLS:
        return None
    text = head.decode("utf-8", errors="replace")
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return f"is a text file (it starts with {text.splitlines()[0][:40]!r}), not a checkpoint"
    return "is not a torch checkpoint (neither torch.save's zip format nor a pickle)"


def _refused_by_weights_only(error: Exception) -> bool:
    """Whether a torch.load failure is the ``weights_only`` unpickler refusing a global (which ``--trusted`` lifts),
    not a damaged file."""
    text = str(error)
    return "weights_only" in text.lower() or "Unsupported global" in text or "WeightsUnpickler" in text


def _last_line(error: Exception) -> str:
    """The informative line of a (possibly long, multi-line) torch.load error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line]
    return (useful or lines or [""])[-1]


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def select_backbone_state_dict(
    checkpoint: Any, entry: str = "teacher", source: str = "checkpoint"
) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, list[str]], str]:
    """The reference MiT state dict inside an authors' checkpoint: ``checkpoint[entry]`` (``"teacher"`` or
    ``"student"``) or a plain state dict, DDP ``module.`` stripped, keys under ``backbone.`` taken without the prefix
    (all keys when there is no ``backbone.``). Returns (state dict, {reason: keys left out}, entry used)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if entry in checkpoint and isinstance(checkpoint[entry], Mapping):
        state, used = checkpoint[entry], entry
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state, used = checkpoint, "state_dict"
    else:
        entries = sorted(str(k) for k in checkpoint)
        raise KeyError(
            f"{source}: no entry {entry!r} holding a state dict (the checkpoint has {_listing(entries)}); the authors' "
            "checkpoints have 'teacher' and 'student'"
        )
    state = {_strip(str(k), "module."): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entry {used!r} is not a state dict (non-tensor values: {_listing(bad)})")
    left_out: dict[str, list[str]] = {}
    if any(k.startswith("backbone.") for k in state):
        selected = OrderedDict((k[len("backbone.") :], v) for k, v in state.items() if k.startswith("backbone."))
        head = [k for k in state if k.startswith("head.")]
        other = [k for k in state if not k.startswith(("backbone.", "head."))]
        if head:
            left_out["head"] = head
        if other:
            left_out["other"] = other
    else:
        selected = OrderedDict(state)
    return selected, left_out, used


def _infer_depths(keys: Sequence[str], pattern: str) -> tuple[int, ...]:
    blocks: dict[int, set[int]] = {}
    for key in keys:
        match = re.match(pattern, key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return tuple(len(blocks[i]) for i in sorted(blocks))


def infer_variant(
    state_dict: Mapping[str, torch.Tensor], source: str = "state dict", required: bool = True
) -> dict[str, Any]:
    """``{"variant", "spatial_dims", "decoder"}`` read from a reference MiT state dict's keys (``variant`` None when
    the block counts match no variant and ``required=False``; an error otherwise)."""
    keys = list(state_dict)
    depths = _infer_depths(keys, r"transformer\.block(\d+)\.(\d+)\.")
    decoder_depths = _infer_depths(keys, r"Decblock(\d+)\.(\d+)\.")
    variant = None
    for name, config in MIT_VARIANTS.items():
        if depths == config["depths"] and decoder_depths in ((), config["decoder_depths"]):
            variant = name
    if variant is None and required:
        known = ", ".join(f"{n}: {c['depths']} / {c['decoder_depths']}" for n, c in MIT_VARIANTS.items())
        raise ValueError(
            f"{source}: encoder depths {depths} and decoder depths {decoder_depths or '(none)'} match no MiT variant "
            f"({known}); is this a UniMiSS MiT checkpoint?"
        )
    paths = tuple(d for d in (2, 3) if any(k.startswith(f"transformer.patch_embed{d}D") for k in keys))
    if not paths:
        raise ValueError(f"{source}: no transformer.patch_embed2D* / 3D* keys; is this a UniMiSS MiT checkpoint?")
    return {"variant": variant, "spatial_dims": paths, "decoder": bool(decoder_depths)}


# --------------------------------------------------------------------------------------------- conversion
def _target_kwargs(
    spatial_dims: Sequence[int], decoder: bool, img_size_2d: int | Sequence[int], img_size_3d: Sequence[int]
) -> dict[str, Any]:
    paths = list(spatial_dims)
    kwargs: dict[str, Any] = {"decoder": bool(decoder), "spatial_dims": paths[0] if len(paths) == 1 else paths}
    size_2d = [img_size_2d] * 2 if isinstance(img_size_2d, int) else list(img_size_2d)
    if size_2d != [DEFAULT_IMG_SIZE_2D] * 2:
        kwargs["img_size_2d"] = size_2d
    if list(img_size_3d) != list(DEFAULT_IMG_SIZE_3D):
        kwargs["img_size_3d"] = list(img_size_3d)
    return kwargs


def convert_unimiss_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: MiT,
    transpose_2d: bool = True,
    source: str = "state dict",
    variant: str | None = None,
    entry: str = "state_dict",
) -> tuple["OrderedDict[str, torch.Tensor]", ConversionReport]:
    """Map a reference MiT state dict (keys without ``backbone.``) onto ``model``'s keys and axis order.

    Returns the converted state dict (exactly ``model``'s keys, ready for ``load_state_dict(strict=True)``) and the
    report. Raises ``ValueError`` naming every shape mismatch (reference key, its shape, the MiT key and the shape it
    needs in the reference's layout and in medssl's) and every MiT key without a source tensor.
    """
    name = f"MiT-{variant}" if variant else "MiT"
    report = ConversionReport(
        source=source,
        entry=entry,
        variant=variant or "?",
        spatial_dims=tuple(model.paths),
        decoder=model.decoder is not None,
        transpose_2d=transpose_2d,
    )
    expected = model.state_dict()
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    mismatches: list[str] = []
    foreign: list[str] = []
    for key, tensor in state_dict.items():
        target = medssl_key(key)
        if target is None:
            report.unused.setdefault("unknown", []).append(key)
            continue
        if target not in expected:
            path = _reference_path(key)
            if model.decoder is None and _is_reference_decoder_key(key):
                report.unused.setdefault("decoder", []).append(key)
            elif path is not None and path not in model.paths:
                report.unused.setdefault(f"path {path}D", []).append(key)
            else:  # a MiT key this model does not have (more blocks / stages than the variant): a structural mismatch
                foreign.append(f"{key} (-> {target})")
            continue
        want = expected[target]
        need = _reference_shape(model, target, want, transpose_2d)
        if tuple(tensor.shape) != need:
            layout = ""
            if need != tuple(want.shape):
                layout = f" in the reference's axis order; {tuple(want.shape)} in MiT's"
            mismatches.append(f"{key} has shape {tuple(tensor.shape)} where MiT key {target} needs {need}{layout}")
            continue
        report.mapped[key] = target
    if foreign:
        raise ValueError(
            f"{source} [{entry}]: {len(foreign)} keys map to no parameter of {name}: " + _listing(foreign)
            + "; the checkpoint is another variant (pass variant=None to read it from the keys)"
        )
    if mismatches:
        hint = ""
        if any("pos_embed" in m.lower() for m in mismatches):
            hint = (
                " (position embeddings are sized by the pretraining input: pass the checkpoint's img_size_2d / "
                "img_size_3d, X, Y, Z depth last)"
            )
        raise ValueError(
            f"{source} [{entry}]: {len(mismatches)} shape mismatches against {name}{hint}: "
            + _listing(mismatches, "; ")
        )
    received = set(report.mapped.values())
    report.missing = [k for k in expected if k not in received]
    if report.missing:
        try:
            actual = infer_variant(state_dict, source, required=False)["variant"]
        except ValueError:  # no patch embeddings at all: the key list below says enough
            actual = None
        if actual not in (None, variant):
            hint = f"; the checkpoint is MiT-{actual} (pass variant=None, or --variant {actual})"
        else:
            hint = "; build the model with the paths / decoder the checkpoint has"
        raise ValueError(
            f"{source} [{entry}]: {len(report.missing)} {name} keys get no tensor from the checkpoint: "
            + _listing([f"{k} (reference {reference_key(k)})" for k in report.missing]) + hint
        )
    # every check passed: now the values (renamed, axis order changed, in the model's dtype, on CPU)
    for key, target in report.mapped.items():
        want = expected[target]
        value = state_dict[key].detach().to("cpu")
        change = _axis_change(model, target, tuple(want.shape), transpose_2d)
        if change is not None:
            value = change[0](value)
            report.axis_changes[target] = change[2]
        converted[target] = value.to(want.dtype).contiguous().clone()
    return OrderedDict((k, converted[k]) for k in expected), report


def convert_unimiss_checkpoint(
    checkpoint_path: str | Path,
    out_path: str | Path,
    entry: str = "teacher",
    variant: str | None = None,
    decoder: bool | None = None,
    spatial_dims: int | Sequence[int] | None = None,
    transpose_2d: bool = True,
    img_size_2d: int | Sequence[int] = DEFAULT_IMG_SIZE_2D,
    img_size_3d: Sequence[int] = DEFAULT_IMG_SIZE_3D,
    strict: bool = False,
    trusted: bool = False,
) -> tuple[Path, Path, ConversionReport]:
    """Convert a published UniMiSS checkpoint into ``out_path`` (MiT state dict) + its manifest (``.json`` beside).

    Args:
        checkpoint_path: the authors' checkpoint (``teacher`` / ``student`` entries) or a plain MiT state dict.
        out_path: the weights file to write, e.g. ``encoder.pt``.
        entry: ``"teacher"`` (default; the EMA network the authors fine-tune from) or ``"student"``.
        variant: ``"tiny"`` / ``"small"``; default read from the checkpoint's block counts.
        decoder: keep the decoder (default: when the checkpoint has one); ``False`` writes the encoder alone.
        spatial_dims: the paths to keep, ``2``, ``3`` or ``[2, 3]`` (default: those in the checkpoint).
        transpose_2d: transpose the 2D kernels / position grids to medssl's column-first 2D order (see module doc).
        img_size_2d / img_size_3d: the input sizes the checkpoint's position embeddings are sized for (3D as
            (X, Y, Z), depth last; the authors': 224 and 96 × 96 × 16).
        strict: refuse a checkpoint with keys the mapping does not know (they are always listed in the report).
        trusted: allow full unpickling when ``weights_only`` loading fails.

    Returns ``(weights path, manifest path, report)``; both files are written atomically after the converted state
    dict loaded strictly into the MiT built from the manifest's ``backbone``.
    """
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"convert_unimiss: out_path {out_path} must be the weights file (e.g. encoder.pt)")
    if entry not in ("teacher", "student"):
        raise ValueError(f"convert_unimiss: entry={entry!r}; expected 'teacher' or 'student'")
    source = str(checkpoint_path)
    checkpoint = load_unimiss_checkpoint(checkpoint_path, trusted=trusted)
    state, left_out, used = select_backbone_state_dict(checkpoint, entry, source)
    found = infer_variant(state, f"{source} [{used}]", required=variant is None)
    variant = variant or found["variant"]
    if variant not in MIT_VARIANTS:
        raise ValueError(f"convert_unimiss: variant={variant!r}; known: {sorted(MIT_VARIANTS)}")
    decoder = found["decoder"] if decoder is None else bool(decoder)
    if spatial_dims is None:
        paths = found["spatial_dims"]
    else:
        paths = (int(spatial_dims),) if isinstance(spatial_dims, int) else tuple(int(d) for d in spatial_dims)
    kwargs = _target_kwargs(sorted(paths), decoder, img_size_2d, img_size_3d)
    factory = f"mit_{variant}"
    model = {"tiny": mit_tiny, "small": mit_small}[variant](**kwargs)
    converted, report = convert_unimiss_state_dict(
        state, model, transpose_2d=transpose_2d, source=source, variant=variant, entry=used
    )
    for reason, keys in left_out.items():
        report.unused.setdefault(reason, []).extend(keys)
    if strict and report.unused.get("unknown"):
        raise ValueError(
            f"{source} [{used}]: {len(report.unused['unknown'])} keys the UniMiSS mapping does not know "
            f"({_listing(report.unused['unknown'])}); strict=True refuses them"
        )
    load_encoder_state_dict(model, converted, f"{source} [{used}] -> {factory}(**{kwargs})")

    single = len(model.paths) == 1
    record: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "weights": out_path.name,
        "method": f"UniMiSS (published checkpoint, {SOURCE_REPOSITORY})",
        "backbone": {"_target_": f"medssl.networks.mit.{factory}", "kwargs": kwargs},
        "spatial_dims": model.paths[0] if single else list(model.paths),
        "in_channels": model.in_channels if single else {"2d": model.in_channels_2d, "3d": model.in_channels_3d},
        "feature_dim": model.feature_dim,
        "preprocessing": {name: v for name, v in UNIMISS_PREPROCESSING.items() if int(name[0]) in model.paths},
        "encoder_key": f"{used}.backbone" if used != "state_dict" else "",
        "source_checkpoint": checkpoint_path.name,
        "source_sha256": file_sha256(checkpoint_path),
        "source_iteration": None,
        "source_epoch": checkpoint.get("epoch") if isinstance(checkpoint.get("epoch"), int) else None,
        "medssl_version": medssl.__version__,
        "num_tensors": len(converted),
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "conversion": report.as_manifest_record(),
    }
    del checkpoint, state
    out_path, manifest_path = write_encoder_files(converted, out_path, record)
    logger.info(f"converted {len(converted)} tensors of {source} [{used}] to {out_path} (+ {manifest_path})")
    return out_path, manifest_path, report
