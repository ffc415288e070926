"""Loading a pretrained encoder into a downstream network: the one entry point every downstream bundle uses.

:func:`load_pretrained_encoder` takes what a user gives as ``pretrained_path``:

* an exported encoder (``encoder.pt`` + ``encoder.json`` manifest from ``tools/export_encoder.py`` or
  ``tools/convert_weights.py``; either file may be named),
* a plain state dict ``.pt`` without a manifest (loaded by key names alone, with a warning),
* an ``https://`` / ``http://`` / ``file://`` URL of an encoder file, with ``sha256``: downloaded once into a cache
  directory with MONAI's ``download_url`` and checked (a mismatch is an error naming both hashes); the manifest is
  looked for at the same URL with ``.json`` (optional),
* the name of a published encoder in ``medssl/weights/catalogue.json`` (``swav_rn50_800ep``, ``dino_vits16``, ...):
  downloaded, converted and cached once by :func:`medssl.weights.catalogue.fetch_encoder` (``tools/weights.py``),
* ``None`` / ``""``: nothing is loaded (``finetune_mode: scratch``),

and loads it into the sub-module ``encoder_prefix`` of the downstream network:

1. **Which entry of the registry** (:data:`ENCODER_ADAPTERS`): the manifest's backbone class and the receiving
   module's class pick an :class:`EncoderAdapter`, which maps source keys to target keys (a prefix to take, e.g. the
   f_intra trunk ``slice_encoder.backbone.`` of a Nguyen et al. 2023 volume encoder for a 2D task) and says which source
   keys may be left out (the unused 2D / 3D path of a dimension-free MiT, a decoder the task does not use). A new
   encoder type plugs in with one :func:`register_encoder_adapter` call.
2. **Dimensionality**: the encoder's pretraining dims (manifest ``spatial_dims`` / backbone kwargs / MiT paths)
   against the task's ``spatial_dims``: a 2D encoder for a 3D task is an error unless ``slice_wise`` (a 2D network
   applied slice by slice); a 3D encoder for a 2D task is an error.
3. **Shapes and names**: every target key must receive a tensor of its shape (``allow_missing`` prefixes excepted);
   any missing key, shape mismatch or unusable source key is an error listing them. Nothing is ever loaded with
   ``strict=False`` hiding a mismatch.
4. **Report**: how many tensors loaded, and the source keys not used (with the reason), printed and returned as a
   :class:`LoadReport`.
5. **Preprocessing**: the manifest's ``preprocessing`` against the bundle's ``preprocessing``: a difference is a
   warning naming both values. :func:`pretrained_preprocessing` gives the manifest's preprocessing merged over a
   bundle's defaults, for bundles that apply it.

Weights are read with ``torch.load(weights_only=True)`` only: a full training checkpoint (optimiser, RNG states) is
refused with the command that exports its encoder.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from medssl.cli import as_sha256
from medssl.utils.dist import get_rank
from medssl.utils.imports import locate
from medssl.utils.io import file_sha256

from .catalogue import fetch_encoder, is_catalogue_name
from .download import default_weights_cache, download_file, is_url
from .export import _key_problems, _listing, _strip_wrappers, load_manifest, manifest_path_for

__all__ = [
    "LoadReport",
    "EncoderAdapter",
    "ENCODER_ADAPTERS",
    "register_encoder_adapter",
    "resolve_pretrained_path",
    "load_pretrained_encoder",
    "pretrained_preprocessing",
    "default_weights_cache",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EncoderAdapter:
    """How an exported encoder's state dict maps onto a receiving module.

    Attributes:
        name: the entry's name (in reports).
        sources: class names of the manifest's ``backbone._target_`` (a class or one of its bases, or the class a factory
            function returns) this entry reads.
        targets: class names of the receiving module this entry writes.
        source_prefix: the source keys taken (this prefix removed), e.g. ``"slice_encoder.backbone."``; ``""``: all.
        optional_source: ``f(key, target_keys) -> reason or None``: a source key the target has no use for, and why
            (it is then listed as ignored, not an error).
        dimension_free: the encoder handles 2D and 3D input with the same weights (MiT).
        dims: the spatial dims of the extracted part when they differ from the source's (the 2D trunk of a volume
            encoder); None: the manifest's.
    """

    name: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    source_prefix: str = ""
    optional_source: Callable[[str, set[str]], str | None] | None = None
    dimension_free: bool = False
    dims: tuple[int, ...] | None = None


def _mit_optional(key: str, target_keys: set[str]) -> str | None:
    parts = key.split(".")
    for path in ("2d", "3d"):
        if path in parts and key not in target_keys:
            return f"the {path.upper()} path, which the task's MiT does not build"
    if parts[0] == "decoder" and key not in target_keys:
        return "the MiT decoder, which the task does not use"
    return None


def _hybrid_optional(key: str, target_keys: set[str]) -> str | None:
    if key == "mask_embedding" and key not in target_keys:
        return "stage 2's [MASK] embedding (pretraining only)"
    return None


def _multimodal_vit_optional(key: str, target_keys: set[str]) -> str | None:
    parts = key.split(".")
    if parts[0] == "tokenizers" and len(parts) > 1 and key not in target_keys:
        return f"the {parts[1]} tokenizer, which the task's network does not build"
    return None


ENCODER_ADAPTERS: list[EncoderAdapter] = []


def register_encoder_adapter(adapter: EncoderAdapter, first: bool = False) -> EncoderAdapter:
    """Add an entry to :data:`ENCODER_ADAPTERS` (``first``: before the built-in ones, to override them)."""
    if first:
        ENCODER_ADAPTERS.insert(0, adapter)
    else:
        ENCODER_ADAPTERS.append(adapter)
    return adapter


_HYBRID = ("HybridVolumeEncoder", "HybridVolumeBackbone")
register_encoder_adapter(EncoderAdapter("resnet", ("ResNetBackbone",), ("ResNetBackbone",)))
register_encoder_adapter(EncoderAdapter("densenet3d", ("DenseNet3D",), ("DenseNet3D",)))
register_encoder_adapter(EncoderAdapter("vit", ("ViTBackbone",), ("ViTBackbone",)))
register_encoder_adapter(
    EncoderAdapter("mit", ("MiT",), ("MiT",), optional_source=_mit_optional, dimension_free=True)
)
register_encoder_adapter(EncoderAdapter("hybrid_volume", _HYBRID, _HYBRID, optional_source=_hybrid_optional))
# MedCoSS: a stage's encoder.pt (MultiModalViT with its text / 2D / 3D tokenizers) into the downstream embedder
register_encoder_adapter(
    EncoderAdapter(
        "multimodal_vit", ("MultiModalViT",), ("MultiModalViT",), optional_source=_multimodal_vit_optional,
        dimension_free=True,
    )
)
# Nguyen et al. 2023: the f_intra trunk of a stage-3 (or stage-2) volume encoder as a 2D ResNet-50 (2D tasks,
# slice-wise 3D)
register_encoder_adapter(
    EncoderAdapter(
        "hybrid_volume_trunk", _HYBRID, ("ResNetBackbone",), source_prefix="slice_encoder.backbone.", dims=(2,)
    )
)
register_encoder_adapter(
    EncoderAdapter(
        "hybrid_volume_slice_encoder", _HYBRID, ("SliceEncoder",), source_prefix="slice_encoder.", dims=(2,)
    )
)


def _class_name(target: str | None) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def _source_classes(target: str | None) -> set[str]:
    """Class names an exported backbone's ``_target_`` stands for: the class and its bases, or, for a factory
    function (``mit_small``, ``resnet50_2d``), its name and its return annotation."""
    import inspect

    names = {_class_name(target)} if target else set()
    if not target:
        return names
    try:
        obj = locate(str(target), "manifest")
    except ImportError:
        return names
    if inspect.isclass(obj):
        names |= {cls.__name__ for cls in obj.__mro__}
    elif callable(obj):
        annotation = inspect.signature(obj).return_annotation
        if annotation is not inspect.Signature.empty:
            names.add(_class_name(annotation if isinstance(annotation, str) else annotation.__name__))
    return names


def _find_adapter(source_target: str | None, target_module: nn.Module) -> EncoderAdapter | None:
    source_classes = _source_classes(source_target)
    target_classes = {cls.__name__ for cls in type(target_module).__mro__}
    for adapter in ENCODER_ADAPTERS:
        if source_classes & set(adapter.sources) and target_classes & set(adapter.targets):
            return adapter
    return None


# ------------------------------------------------------------------------------------------------------ report
@dataclass
class LoadReport:
    """What :func:`load_pretrained_encoder` did."""

    source: str
    loaded: list[str] = field(default_factory=list)
    not_loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    manifest: dict | None = None
    adapter: str | None = None
    target: str = ""

    def summary(self) -> str:
        if not self.source:
            return f"{self.target or 'encoder'}: no pretrained weights (random initialisation)"
        text = (
            f"{self.target or 'encoder'}: loaded {len(self.loaded)} tensors from {self.source}"
            + (f" (adapter {self.adapter})" if self.adapter else "")
        )
        if self.not_loaded:
            text += f"; {len(self.not_loaded)} tensors left at initialisation: {_listing(self.not_loaded)}"
        if self.ignored:
            text += f"; {len(self.ignored)} source tensors not used: {_listing(self.ignored)}"
        return text


# --------------------------------------------------------------------------------------------------- resolving
def resolve_pretrained_path(
    path: str | Path, sha256: str | int | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local file for ``path``: a URL is downloaded once into ``cache_dir`` (default
    :func:`default_weights_cache`) under ``<sha256[:16]>/<file name>`` and its hash checked (``sha256`` is required
    for http(s) URLs); the manifest at the URL with ``.json`` is fetched beside it when it exists. A local file with
    ``sha256`` is checked too. Errors name the file / URL and both hashes. ``sha256`` is read by
    :func:`medssl.cli.as_sha256` (an all-digit hash that a command line turned into an int counts; a value that is
    not 64 hexadecimal digits is an error)."""
    sha256 = as_sha256(sha256, "pretrained_sha256")
    if is_url(path):
        url = str(path)
        if not sha256 and urlparse(url).scheme != "file":
            raise ValueError(f"pretrained_path {url}: a URL needs pretrained_sha256 (the sha256 of the file)")
        name = os.path.basename(urlparse(url).path) or "encoder.pt"
        cache = Path(cache_dir) if cache_dir else default_weights_cache()
        dest = cache / (sha256[:16].lower() if sha256 else "unchecked") / name
        if dest.is_file() and sha256 and file_sha256(dest).lower() != sha256.lower():
            logger.warning(f"{dest}: cached copy does not match pretrained_sha256 {sha256}; downloading again")
            dest.unlink()
        if not dest.is_file():
            logger.info(f"downloading {url} -> {dest}")
            download_file(url, dest, sha256)
        manifest_url = url[: -len(Path(name).suffix)] + ".json" if Path(name).suffix else url + ".json"
        manifest_dest = manifest_path_for(dest)
        if Path(name).suffix != ".json" and not manifest_dest.is_file():
            try:
                download_file(manifest_url, manifest_dest, None)
            except Exception as e:  # noqa: BLE001 - the manifest is optional for a URL
                logger.info(f"{manifest_url}: no manifest fetched ({type(e).__name__}); loading by key names")
        return dest
    local = Path(str(path)[7:] if str(path).startswith("file://") else path).expanduser()
    if not local.exists():
        if is_catalogue_name(path):  # a published encoder by name (medssl/weights/catalogue.json)
            return fetch_encoder(str(path), cache_dir=cache_dir, sha256=sha256)
        raise FileNotFoundError(
            f"pretrained_path {path}: no such file (nor a weights catalogue name: tools/weights.py list)"
        )
    if sha256:
        weights = local if local.suffix != ".json" else local.with_suffix(".pt")
        actual = file_sha256(weights)
        if actual.lower() != sha256.lower():
            raise ValueError(f"{weights}: sha256 {actual} differs from pretrained_sha256 {sha256}")
    return local


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with the file name and the way out
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])[:160]
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {first_line}). "
            "A training checkpoint holds more than weights: export its encoder first with "
            "`python tools/export_encoder.py --bundle BUNDLE --checkpoint CKPT --out encoder.pt`"
        ) from e
    if isinstance(state, Mapping) and "method" in state and isinstance(state["method"], Mapping):
        raise ValueError(
            f"{path}: is a medssl training checkpoint, not an encoder file; export the encoder with "
            "`python tools/export_encoder.py --bundle BUNDLE --checkpoint CKPT --out encoder.pt`"
        )
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {_strip_wrappers(str(k)): v for k, v in state.items()}


def _locate_files(local: Path) -> tuple[Path, dict | None]:
    """(weights file, manifest or None) for a local ``.pt`` or ``.json``."""
    if local.suffix == ".json":
        manifest = load_manifest(local)
        weights = Path(manifest["_manifest_path"]).parent / manifest["weights"]
        if not weights.is_file():
            raise FileNotFoundError(f"{local}: its weights file {weights} does not exist")
        return weights, manifest
    manifest_file = manifest_path_for(local)
    manifest = load_manifest(manifest_file) if manifest_file.is_file() else None
    if manifest is not None and manifest.get("encoder_sha256"):
        actual = file_sha256(local)
        if actual != manifest["encoder_sha256"]:
            raise ValueError(
                f"{local}: sha256 {actual} differs from encoder_sha256 {manifest['encoder_sha256']} in "
                f"{manifest_file} (the file was changed after the export)"
            )
    return local, manifest


# ---------------------------------------------------------------------------------------------- dimensionality
def _as_dims(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _source_dims(manifest: Mapping[str, Any] | None, adapter: EncoderAdapter | None) -> tuple[int, ...] | None:
    if adapter is not None and adapter.dims is not None:
        return adapter.dims
    if manifest is None:
        return None
    kwargs = (manifest.get("backbone") or {}).get("kwargs") or {}
    dims = _as_dims(manifest.get("spatial_dims")) or _as_dims(kwargs.get("spatial_dims"))
    if dims is None and adapter is not None and adapter.dimension_free:
        dims = (2, 3)
    return dims


def _target_dims(module: nn.Module) -> tuple[int, ...] | None:
    return _as_dims(getattr(module, "paths", None)) or _as_dims(getattr(module, "spatial_dims", None))


def _describe_dims(dims: Sequence[int] | None) -> str:
    return "/".join(f"{d}D" for d in dims) if dims else "unknown-D"


def _shape_mismatches(target_state: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> list[str]:
    return [
        f"{k}: {tuple(source[k].shape)} vs {tuple(v.shape)}"
        for k, v in target_state.items()
        if k in source and tuple(source[k].shape) != tuple(v.shape)
    ]


# --------------------------------------------------------------------------------------------------- the loader
def load_pretrained_encoder(
    network: nn.Module,
    pretrained_path: str | Path | None,
    *,
    sha256: str | int | None = None,
    encoder_prefix: str = "encoder",
    spatial_dims: int | None = None,
    slice_wise: bool = False,
    preprocessing: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    allow_missing: Sequence[str] = (),
    verbose: bool = True,
) -> LoadReport:
    """Load a pretrained encoder into ``network.get_submodule(encoder_prefix)``; see the module docstring.

    Args:
        network: the downstream network (or the encoder itself with ``encoder_prefix=""``).
        pretrained_path: encoder ``.pt`` / ``.json``, plain state dict, URL, or None / "" (nothing loaded).
        sha256: expected sha256 of the weights file (required for http(s) URLs).
        encoder_prefix: dotted path of the receiving sub-module.
        spatial_dims: the dims of the task's input (2 or 3); None skips the dimensionality check.
        slice_wise: the task applies a 2D encoder slice by slice to volumes (a 2D encoder is then fine for 3D).
        preprocessing: the bundle's preprocessing description, compared with the manifest's.
        cache_dir: download cache for URLs.
        allow_missing: target-key prefixes that may stay at initialisation (listed in the report).
        verbose: print the report (rank 0 of a distributed run).

    Returns a :class:`LoadReport`. Raises ``FileNotFoundError`` / ``ValueError`` naming the file, the mismatched keys
    (missing, unexpected, shape), the dimensions, or the hashes.
    """
    try:
        target = network.get_submodule(encoder_prefix) if encoder_prefix else network
    except AttributeError as e:
        raise KeyError(f"load_pretrained_encoder: {type(network).__name__} has no sub-module {encoder_prefix!r}") from e
    where = f"{type(network).__name__}.{encoder_prefix}" if encoder_prefix else type(network).__name__
    if pretrained_path is None or str(pretrained_path).strip() in ("", "None", "none"):
        report = LoadReport(source="", target=where)
        _emit(report, verbose)
        return report

    local = resolve_pretrained_path(pretrained_path, sha256=sha256, cache_dir=cache_dir)
    weights, manifest = _locate_files(local)
    source = str(weights)
    source_state = _read_state_dict(weights)
    target_state = target.state_dict()
    target_keys = set(target_state)

    source_target = (manifest or {}).get("backbone", {}).get("_target_") if manifest else None
    source_class = _class_name(source_target)
    adapter = _find_adapter(source_target, target) if manifest else None
    if manifest is not None and adapter is None:
        mismatched = sorted(set(source_state) ^ target_keys)
        raise ValueError(
            f"{source}: encoder {source_target} (from {manifest['_manifest_path']}) cannot be loaded into "
            f"{where} ({type(target).__name__}): no entry of medssl.weights.loading.ENCODER_ADAPTERS maps "
            f"{source_class} to {type(target).__name__}. Keys that differ: {_listing(mismatched)}"
        )
    if manifest is None:
        logger.warning(f"{source}: no manifest beside it; loading by key names only (no dimension or preprocessing check)")

    # dimensionality
    src_dims = _source_dims(manifest, adapter)
    tgt_dims = _target_dims(target)
    if spatial_dims is not None and src_dims is not None:
        ok = spatial_dims in src_dims or (slice_wise and spatial_dims == 3 and 2 in src_dims)
        if not ok:
            why = (
                "a 2D encoder cannot serve a 3D-only head (use a slice-wise network, or a 3D / dimension-free encoder)"
                if spatial_dims == 3
                else "a 3D encoder cannot serve a 2D task"
            )
            raise ValueError(
                f"{source}: {_describe_dims(src_dims)} encoder ({source_class or 'state dict'}) offered to a "
                f"{spatial_dims}D task ({where}): {why}. Mismatched keys: "
                f"{_listing(_shape_mismatches(target_state, _map_keys(source_state, adapter)) or sorted(set(source_state) ^ target_keys))}"
            )
    if src_dims is not None and tgt_dims is not None and not (adapter and adapter.dimension_free):
        if not set(tgt_dims) & set(src_dims):
            raise ValueError(
                f"{source}: {_describe_dims(src_dims)} encoder ({source_class}) but {where} is "
                f"{_describe_dims(tgt_dims)}; mismatched keys: "
                f"{_listing(_shape_mismatches(target_state, _map_keys(source_state, adapter)))}"
            )

    # key mapping and checks
    mapped = _map_keys(source_state, adapter)
    ignored, unexpected = [], []
    for key in sorted(set(source_state)):
        new = _mapped_name(key, adapter)
        if new is None:
            ignored.append(f"{key} (outside {adapter.source_prefix!r})")
        elif new not in target_keys:
            reason = adapter.optional_source(new, target_keys) if adapter and adapter.optional_source else None
            if reason:
                ignored.append(f"{key} ({reason})")
            else:
                unexpected.append(key)
    allowed = tuple(p.rstrip(".") for p in allow_missing)
    missing = [k for k in target_state if k not in mapped]
    not_loaded = [k for k in missing if allowed and any(k == p or k.startswith(p + ".") for p in allowed)]
    missing = [k for k in missing if k not in not_loaded]
    shape = _shape_mismatches(target_state, mapped)
    labels = (
        f"keys of {where} not in the file", f"keys of the file unknown to {where}", f"shape mismatches, file vs {where}"
    )
    problems = _key_problems(missing, unexpected, shape, labels)
    if problems:
        arch = f"{source_class} -> {type(target).__name__}" if source_class else type(target).__name__
        raise ValueError(f"{source}: does not fit {where} ({arch}): " + "; ".join(problems))
    to_load = {k: v for k, v in mapped.items() if k in target_keys}
    target.load_state_dict({**target_state, **to_load}, strict=True)

    if manifest is not None and preprocessing is not None:
        _compare_preprocessing(manifest, preprocessing, source)
    report = LoadReport(
        source=source,
        loaded=sorted(to_load),
        not_loaded=not_loaded,
        ignored=ignored,
        manifest=dict(manifest) if manifest else None,
        adapter=adapter.name if adapter else None,
        target=where,
    )
    _emit(report, verbose)
    return report


def _mapped_name(key: str, adapter: EncoderAdapter | None) -> str | None:
    if adapter is None or not adapter.source_prefix:
        return key
    return key[len(adapter.source_prefix) :] if key.startswith(adapter.source_prefix) else None


def _map_keys(state: Mapping[str, torch.Tensor], adapter: EncoderAdapter | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = _mapped_name(key, adapter)
        if new is not None:
            out[new] = value
    return out


def _emit(report: LoadReport, verbose: bool) -> None:
    if verbose and get_rank() == 0:
        print(report.summary(), flush=True)
        logger.debug(report.summary())  # printed already: an INFO record would show it twice on a bundle's console
    else:
        logger.info(report.summary())


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _compare_preprocessing(manifest: Mapping[str, Any], preprocessing: Mapping[str, Any], source: str) -> list[str]:
    pretrained = manifest.get("preprocessing")
    if not isinstance(pretrained, Mapping):
        logger.warning(f"{source}: the manifest records no preprocessing; cannot compare with the bundle's")
        return []
    a, b = _flat(pretrained), _flat(preprocessing)
    diffs = [f"{k}: pretrained {a[k]!r} vs bundle {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if diffs:
        logger.warning(
            f"{source}: the encoder was pretrained with different preprocessing than this bundle uses: "
            + "; ".join(diffs)
            + f". Pretrained: {dict(pretrained)}; bundle: {dict(preprocessing)}"
        )
    return diffs


def pretrained_preprocessing(
    pretrained_path: str | Path | None,
    default: Mapping[str, Any],
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The bundle's ``default`` preprocessing with the fields the encoder's manifest also records replaced by the
    manifest's values (so a bundle applies the encoder's own intensity presets); ``default`` itself when there is
    no pretrained path or no manifest. Only keys of ``default`` are taken (top level)."""
    result = dict(default)
    if pretrained_path is None or str(pretrained_path).strip() in ("", "None", "none"):
        return result
    local = resolve_pretrained_path(pretrained_path, sha256=sha256, cache_dir=cache_dir)
    _, manifest = _locate_files(local)
    recorded = (manifest or {}).get("preprocessing")
    if isinstance(recorded, Mapping):
        for key in result:
            if key in recorded:
                result[key] = recorded[key]
    return result
