"""Export of a pretrained encoder: a plain state dict ``encoder.pt`` plus a JSON manifest ``encoder.json``.

A medssl training checkpoint (``medssl.engines.CheckpointHandler``) holds the whole method's state dict under
``checkpoint["method"]`` (backbone, heads, prototypes, teacher...). :func:`export_encoder` takes the encoder's part
of it (the keys under a prefix, ``"backbone."`` by default; ``"module."`` of a DDP wrapper and ``"_orig_mod."`` of
``torch.compile`` are stripped first), and writes, atomically:

* ``<out>.pt`` — ``torch.save`` of a plain ``{name: tensor}`` state dict (CPU, contiguous; loadable with
  ``torch.load(weights_only=True)``), the keys exactly those of the backbone module;
* ``<out>.json`` — the manifest (same stem, same directory)::

    {"format": "medssl-encoder/1",
     "weights": "encoder.pt",                      # the state dict file, relative to the manifest
     "method": "medssl.methods.SwAV",              # what pretrained it
     "backbone": {"_target_": "medssl.networks.ResNetBackbone", "kwargs": {...}},
     "spatial_dims": 2, "in_channels": 1, "feature_dim": 2048,
     "preprocessing": {...},                       # how the images were prepared (a free-form description)
     "encoder_key": "backbone",                    # the prefix taken from the method's state dict
     "source_checkpoint": "checkpoint_final.pt", "source_sha256": "...", "source_iteration": 1200, "source_epoch": 100,
     "encoder_sha256": "...",                      # of the .pt file
     "medssl_version": "0.1.0", "num_tensors": 320, "num_params": 23508032}

When the manifest names the backbone (``_target_`` + ``kwargs``), the export builds it and loads the extracted
state dict strictly before writing anything, so an export that a downstream bundle could not load fails here,
naming the checkpoint and the mismatching keys / shapes; ``spatial_dims`` / ``in_channels`` / ``feature_dim`` are
then read from the built module when the manifest does not give them.

:func:`load_manifest` reads and checks a manifest; :func:`build_encoder_from_manifest` rebuilds the encoder from it
(target class + kwargs, state dict loaded strictly, sha256 of the weights checked).

Checkpoints are read with ``torch.load(weights_only=False)`` (they hold RNG states and optimiser state): export only
checkpoints you trust. The exported ``.pt`` itself is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import medssl
from medssl.utils.imports import locate
from medssl.utils.io import ENCODER_MANIFEST_FORMAT, atomic_write, atomic_write_text, file_sha256

__all__ = [
    "MANIFEST_FORMAT",
    "export_encoder",
    "extract_encoder_state_dict",
    "load_manifest",
    "build_encoder_from_manifest",
    "load_encoder_state_dict",
    "manifest_path_for",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = ENCODER_MANIFEST_FORMAT
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10


def manifest_path_for(weights_path: str | Path) -> Path:
    """The manifest beside a weights file: same directory and stem, ``.json``."""
    return Path(weights_path).with_suffix(".json")


def _listing(names: Sequence[str], separator: str = ", ") -> str:
    """At most 10 of ``names`` on one line, then "... and N more" (a checkpoint of another family lists hundreds)."""
    shown = separator.join(names[:_MAX_LISTED])
    return shown + (f"{separator}... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _key_problems(
    missing: list[str], unexpected: list[str], mismatched: list[str], labels: tuple[str, str, str]
) -> list[str]:
    """``"<n> <label> (<listing>)"`` for each non-empty one of the missing keys, the unexpected keys and the shape
    mismatches (``labels`` in that order), for a state-dict-does-not-fit error."""
    groups = zip((missing, unexpected, mismatched), labels)
    return [f"{len(keys)} {label} ({_listing(keys)})" for keys, label in groups if keys]


def _strip_wrappers(key: str, prefixes: tuple[str, ...] = _WRAPPER_PREFIXES) -> str:
    """``key`` without its leading wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``, ...)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _top_prefixes(keys: list[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in keys})


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"export_encoder: {path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not in the zip format mmap needs (a legacy torch.save file)
        return torch.load(path, map_location="cpu", weights_only=False)


def _method_state_dict(checkpoint: Any, method_key: str | None, source: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if method_key and method_key in checkpoint and isinstance(checkpoint[method_key], Mapping):
        state = checkpoint[method_key]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint  # already a plain state dict (of the method or of the encoder)
    else:
        entries = sorted(str(k) for k in checkpoint)
        raise KeyError(
            f"{source}: no method state dict under {method_key!r} (the checkpoint has {_listing(entries)}); "
            "pass method_key= the entry that holds the model"
        )
    # nn.Module.get_extra_state entries (SwAV's queue, DeepCluster's bank) are per-run state, never encoder weights
    state = {k: v for k, v in state.items() if not str(k).endswith("_extra_state")}
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entry {method_key!r} is not a state dict (non-tensor values: {_listing(bad)})")
    return state


def extract_encoder_state_dict(
    state_dict: Mapping[str, torch.Tensor], encoder_key: str = "backbone", source: str = "state dict"
) -> "OrderedDict[str, torch.Tensor]":
    """The sub-state-dict of ``state_dict`` under ``encoder_key`` (a dotted module path such as ``"backbone"`` or
    ``"teacher.backbone"``; ``""`` = everything), keys without the prefix, DDP ``module.`` / ``torch.compile``
    ``_orig_mod.`` wrappers stripped; tensors copied to contiguous CPU tensors. An error names ``source`` and the
    top-level prefixes present when no key matches."""
    keys = {_strip_wrappers(str(k)): v for k, v in state_dict.items()}
    if not encoder_key:
        selected = keys
    else:
        prefix = encoder_key.rstrip(".") + "."
        selected = {k[len(prefix) :]: v for k, v in keys.items() if k.startswith(prefix)}
    if not selected:
        raise KeyError(
            f"{source}: no tensor under {encoder_key!r}; the state dict's top-level entries are "
            f"{_listing(_top_prefixes(list(keys)))}"
        )
    return OrderedDict((k, v.detach().to("cpu", copy=True).contiguous()) for k, v in selected.items())


def _json_ready(value: Any, where: str) -> Any:
    """``value`` with tuples as lists, checked to be JSON data; the error names the field."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"manifest{where}: {value} is not valid JSON")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"manifest{where}: key {k!r} is not a str")
            out[k] = _json_ready(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _json_ready(value.item(), where)
    raise TypeError(f"manifest{where}: {type(value).__name__} value {value!r} is not JSON data")


def _backbone_spec(manifest: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    spec = manifest.get("backbone")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("_target_"), str):
        raise ValueError(f"{source}: field 'backbone' must be {{'_target_': 'package.Class', 'kwargs': {{...}}}}")
    kwargs = spec.get("kwargs", {}) or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: field 'backbone.kwargs' must be an object, got {type(kwargs).__name__}")
    return spec["_target_"], dict(kwargs)


def _instantiate(manifest: Mapping[str, Any], source: str) -> nn.Module:
    target, kwargs = _backbone_spec(manifest, source)
    factory = locate(target, source)
    try:
        module = factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"{source}: cannot build backbone {target}(**{kwargs}): {e}") from e
    if not isinstance(module, nn.Module):
        raise TypeError(f"{source}: backbone {target} built a {type(module).__name__}, not an nn.Module")
    return module


def load_encoder_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that names ``source`` and lists the
    missing keys, the unexpected keys and the shape mismatches (expected vs found)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} where the backbone has {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = _key_problems(missing, unexpected, mismatched, ("missing keys", "unexpected keys", "shape mismatches"))
    if problems:
        raise ValueError(
            f"{source}: the state dict does not fit the backbone {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(state_dict, strict=True)


def _module_facts(module: nn.Module) -> dict[str, Any]:
    facts: dict[str, Any] = {"num_params": int(sum(p.numel() for p in module.parameters()))}
    for name in ("spatial_dims", "in_channels", "feature_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            facts[name] = value
    return facts


def _given_or(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def export_encoder(
    checkpoint_path: str | Path,
    out_path: str | Path,
    encoder_key: str = "backbone",
    method_key: str = "method",
    manifest: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> tuple[Path, Path]:
    """Write the encoder of a medssl checkpoint as ``out_path`` (a plain state dict) and its manifest beside it.

    Args:
        checkpoint_path: a checkpoint of ``medssl.engines.CheckpointHandler`` (the method under ``method_key``), or
            a plain state dict file (of the method, or of the encoder with ``encoder_key=""``).
        out_path: the state dict file to write, e.g. ``encoder.pt``; the manifest is ``encoder.json`` beside it.
        encoder_key: the encoder's module path inside the method (``"backbone"``, ``"teacher.backbone"``...).
        method_key: the checkpoint entry holding the method's state dict.
        manifest: the description fields (see the module docstring): ``method``, ``backbone`` (``_target_`` +
            ``kwargs``), ``preprocessing``, ``spatial_dims`` / ``in_channels`` / ``feature_dim``, anything else
            JSON-serialisable; tuples are written as lists. The provenance fields are filled in here.
        verify: build the backbone from ``manifest["backbone"]`` and load the state dict strictly before writing
            (needs ``manifest["backbone"]``; without it the export is written unverified, with a warning).

    Returns:
        ``(state dict path, manifest path)``. Both files are written atomically (temp file + rename), the state
        dict first, so a manifest always describes a complete weights file.
    """
    checkpoint_path, out_path = Path(checkpoint_path), Path(out_path)
    manifest_path = manifest_path_for(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"export_encoder: out_path {out_path} must be the weights file (e.g. encoder.pt)")
    source = str(checkpoint_path)
    checkpoint = _read_checkpoint(checkpoint_path)
    state = _method_state_dict(checkpoint, method_key, source)
    encoder_state = extract_encoder_state_dict(state, encoder_key, source)

    fields: dict[str, Any] = dict(manifest or {})
    for reserved in ("format", "weights", "encoder_sha256", "source_sha256", "num_tensors"):
        fields.pop(reserved, None)
    facts: dict[str, Any] = {}
    if "backbone" in fields and verify:
        module = _instantiate(fields, f"export_encoder({source}, encoder_key={encoder_key!r})")
        load_encoder_state_dict(module, encoder_state, f"{source} [{encoder_key or 'all'}]")
        facts = _module_facts(module)
    elif verify:
        logger.warning(f"export_encoder: the manifest names no backbone; {out_path} is written without a load check")
    for name, value in facts.items():
        if name != "num_params" and fields.get(name) is not None and fields[name] != value:
            raise ValueError(
                f"export_encoder: manifest {name}={fields[name]!r} but the backbone built from "
                f"manifest['backbone'] has {name}={value!r}"
            )

    engine_state = checkpoint.get("engine") if isinstance(checkpoint, Mapping) else None
    record: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "weights": out_path.name,
        "method": fields.pop("method", None),
        "backbone": fields.pop("backbone", None),
        "spatial_dims": _given_or(fields.pop("spatial_dims", None), facts.get("spatial_dims")),
        "in_channels": _given_or(fields.pop("in_channels", None), facts.get("in_channels")),
        "feature_dim": _given_or(fields.pop("feature_dim", None), facts.get("feature_dim")),
        "preprocessing": fields.pop("preprocessing", None),
        "encoder_key": encoder_key,
        "source_checkpoint": checkpoint_path.name,
        "source_sha256": file_sha256(checkpoint_path),
        "source_iteration": engine_state.get("iteration") if isinstance(engine_state, Mapping) else None,
        "source_epoch": engine_state.get("epoch") if isinstance(engine_state, Mapping) else None,
        "medssl_version": medssl.__version__,
        "num_tensors": len(encoder_state),
        "num_params": facts.get("num_params", fields.pop("num_params", None)),
    }
    fields.pop("num_params", None)
    record.update(fields)  # anything else the caller described (bundle name / version, notes...)
    del checkpoint, state
    write_encoder_files(encoder_state, out_path, record, manifest_path)
    logger.info(
        f"exported {len(encoder_state)} tensors of {source} [{encoder_key or 'all'}] to {out_path} (+ {manifest_path})"
    )
    return out_path, manifest_path


def write_encoder_files(
    state_dict: Mapping[str, torch.Tensor],
    out_path: str | Path,
    record: Mapping[str, Any],
    manifest_path: str | Path | None = None,
) -> tuple[Path, Path]:
    """Write an encoder file (plain state dict) and its JSON manifest atomically; the manifest gets the file's
    ``encoder_sha256``. Shared by :func:`export_encoder` and the weight converters."""
    out_path = Path(out_path)
    manifest_path = manifest_path_for(out_path) if manifest_path is None else Path(manifest_path)
    record = _json_ready(dict(record), "")
    atomic_write(out_path, lambda f: torch.save(dict(state_dict), f))
    record["encoder_sha256"] = file_sha256(out_path)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write_text(manifest_path, text)
    return out_path, manifest_path


def method_state_dict(checkpoint: Any, method_key: str | None = "method", source: str = "checkpoint") -> dict:
    """The method's state dict inside a medssl checkpoint dict (or the dict itself when it already is a plain state
    dict), without nn.Module extra-state entries; errors name ``source``."""
    return dict(_method_state_dict(checkpoint, method_key, source))


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check an encoder manifest. ``path`` is the ``.json`` file or the weights file beside it. The
    returned dict has the file's fields plus ``"_manifest_path"`` (str) so that the weights can be found."""
    path = Path(path)
    if path.suffix != ".json":
        path = manifest_path_for(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such encoder manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: the manifest must be a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: field 'format' is {manifest.get('format')!r}; expected {MANIFEST_FORMAT!r}")
    for field in ("weights", "backbone"):
        if field not in manifest:
            raise ValueError(f"{path}: missing field {field!r}")
    _backbone_spec(manifest, str(path))
    manifest["_manifest_path"] = str(path)
    return manifest


def build_encoder_from_manifest(
    manifest: Mapping[str, Any] | str | Path,
    weights_path: str | Path | None = None,
    check_hash: bool = True,
    map_location: Any = "cpu",
) -> nn.Module:
    """Rebuild an exported encoder: instantiate ``manifest["backbone"]["_target_"](**kwargs)`` and load the state
    dict strictly (errors name the file and the missing / unexpected keys and shape mismatches).

    Args:
        manifest: a dict from :func:`load_manifest`, or the path of the manifest / weights file.
        weights_path: the state dict file; default ``manifest["weights"]`` beside the manifest file.
        check_hash: compare the weights file's sha256 with ``manifest["encoder_sha256"]`` first.
        map_location: ``torch.load`` map location.

    Returns the backbone module (in training mode, as built; call ``.eval()`` for inference).
    """
    if not isinstance(manifest, Mapping):
        manifest = load_manifest(manifest)
    source = str(manifest.get("_manifest_path", "manifest"))
    if weights_path is None:
        if "_manifest_path" not in manifest or "weights" not in manifest:
            raise ValueError(f"{source}: give weights_path (the manifest does not say where its weights file is)")
        weights_path = Path(manifest["_manifest_path"]).parent / manifest["weights"]
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{source}: weights file {weights_path} not found")
    expected_hash = manifest.get("encoder_sha256")
    if check_hash and expected_hash:
        actual = file_sha256(weights_path)
        if actual != expected_hash:
            raise ValueError(
                f"{weights_path}: sha256 {actual} differs from encoder_sha256 {expected_hash} in {source} (the file "
                "was changed or corrupted after the export)"
            )
    try:
        state = torch.load(weights_path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise ValueError(f"{weights_path}: cannot be read as a state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # a MedCoSS stage encoder.pt
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights_path}: not a plain state dict of tensors")
    module = _instantiate(manifest, source)
    load_encoder_state_dict(module, state, str(weights_path))
    return module
