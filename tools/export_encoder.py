"""Export the pretrained encoder of a medssl pretraining bundle: a plain state dict plus a JSON manifest.

Usage:
    python tools/export_encoder.py --bundle BUNDLE_DIR --checkpoint CKPT --out encoder.pt \\
        [--config configs/train.json] [--encoder-id backbone] [--encoder-key backbone] \\
        [--preprocessing-id preprocessing_spec] [--method-key method] [--publish-url https://host/folder]

What it does:
1. parses the bundle's configs with ``monai.bundle.ConfigParser``: ``configs/metadata.json`` plus the given config
   files (default: the run's ``run_config.json``, see below; several:
   ``--config "[configs/train.json,configs/extra.json]"``; paths are relative to the bundle unless they exist as
   given); ``bundle_root`` is set to BUNDLE_DIR;
2. takes the backbone definition at config id ``--encoder-id`` (default ``backbone``): its ``_target_`` and its
   arguments, with ``@`` references and ``$`` expressions evaluated (they must give JSON data);
3. takes the preprocessing description at config id ``--preprocessing-id`` (default ``preprocessing_spec``; a
   JSON-able dict saying how images are prepared: modality presets, spacing, crop size...) when the config has it;
4. calls ``medssl.weights.export.export_encoder``: the tensors under ``--encoder-key`` (default ``backbone``) of
   the checkpoint's ``--method-key`` entry (default ``method``) are written to OUT, and the manifest (``.json``
   beside OUT) records the method (``_target_`` of the config's ``method``), the backbone, spatial dims, input
   channels, feature size, the preprocessing, the bundle name / version, the hashes of both files, the iteration and
   epoch of the checkpoint, and its provenance: a hash of the resolved config, the git commit of the bundle's checkout
   (when it is one) and the datalist's name with its training items per modality. The state
   dict is loaded strictly into the backbone built from the config before anything is written.

CKPT may be a checkpoint file or a ``ckpt_dir`` (its latest complete checkpoint is used). Without ``--config`` the
run's own config is parsed: the ``run_config.json`` the pretraining bundles save in their run folder
(``output_dir``, the parent of ``ckpt_dir``), with every override file and command-line value of the run; a run
without one falls back to ``configs/train.json``. A downstream bundle loads the result with
``medssl.weights.export.build_encoder_from_manifest("encoder.json")``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from medssl.cli import run
from medssl.weights.export import export_encoder

_SPECIAL_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")


def _config_files(bundle: Path, config: Any) -> list[Path]:
    if config is None:
        config = ["configs/train.json"]
    elif isinstance(config, str):
        config = [c for c in config.split(",") if c.strip()]
    files = []
    for entry in config:
        path = Path(str(entry).strip())
        if not path.is_file() and (bundle / path).is_file():
            path = bundle / path
        if not path.is_file():
            raise FileNotFoundError(f"--config {entry}: not found (as given, nor in {bundle})")
        files.append(path)
    return files


def _full_target(parser: Any, target: str, where: str) -> str:
    if "." in target:
        return target
    module = parser.locator.get_component_module_name(target)
    if isinstance(module, str):
        return f"{module}.{target}"
    raise ValueError(f"{where}: _target_ {target!r} is not a full dotted path and MONAI does not locate it uniquely")


def backbone_definition(parser: Any, encoder_id: str, where: str) -> dict[str, Any]:
    """``{"_target_": full dotted path, "kwargs": {...evaluated arguments}}`` of the component at ``encoder_id``."""
    from monai.bundle.utils import ID_SEP_KEY

    raw = parser.get(encoder_id)
    seen = {encoder_id}
    while isinstance(raw, str) and raw.startswith("@") and raw[1:] not in seen:  # follow "backbone": "@backbone_2d"
        encoder_id = raw[1:]
        seen.add(encoder_id)
        raw = parser.get(encoder_id)
    if raw is None:
        raise KeyError(f"{where}: no config id {encoder_id!r} (pass --encoder-id, the id of the backbone definition)")
    if not isinstance(raw, dict) or not isinstance(raw.get("_target_"), str):
        raise ValueError(f"{where}: config id {encoder_id!r} is not a component definition with a _target_")
    kwargs = {}
    for key in raw:
        if key in _SPECIAL_KEYS:
            continue
        value = parser.get_parsed_content(f"{encoder_id}{ID_SEP_KEY}{key}")
        try:
            json.dumps(value)
        except TypeError as e:
            raise TypeError(
                f"{where}: {encoder_id}{ID_SEP_KEY}{key} evaluates to a {type(value).__name__}, which the manifest "
                "cannot record; give the backbone JSON-able arguments"
            ) from e
        kwargs[key] = value
    return {"_target_": _full_target(parser, raw["_target_"], where), "kwargs": kwargs}


def build_manifest(
    bundle: str | Path,
    config: Any = None,
    encoder_id: str = "backbone",
    preprocessing_id: str = "preprocessing_spec",
) -> dict[str, Any]:
    """The manifest fields described by a bundle's configs (see the module docstring)."""
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"--bundle {bundle}: not a directory")
    files = _config_files(bundle, config)
    where = ", ".join(str(f) for f in files)
    parser = ConfigParser()
    meta_file = bundle / "configs" / "metadata.json"
    if meta_file.is_file():
        parser.read_meta(meta_file)
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(bundle)
    meta = parser.get("_meta_", {}) or {}

    manifest: dict[str, Any] = {"backbone": backbone_definition(parser, encoder_id, where)}
    method = parser.get("method")
    if isinstance(method, dict) and isinstance(method.get("_target_"), str):
        manifest["method"] = _full_target(parser, method["_target_"], where)
    else:
        manifest["method"] = meta.get("name") or bundle.name
    if preprocessing_id and parser.get(preprocessing_id) is not None:
        preprocessing = parser.get_parsed_content(preprocessing_id)
        try:
            json.dumps(preprocessing)
        except TypeError as e:
            raise TypeError(
                f"{where}: config id {preprocessing_id!r} evaluates to a {type(preprocessing).__name__}; it must be a "
                "JSON-able description of the preprocessing"
            ) from e
        manifest["preprocessing"] = preprocessing
    else:
        manifest["preprocessing"] = None
    manifest["bundle"] = {
        "name": meta.get("name") or bundle.name,
        "version": meta.get("version"),
        "configs": [f.name for f in files],
        "encoder_id": encoder_id,
    }
    manifest["provenance"] = provenance(parser, bundle)
    return manifest


def provenance(parser: Any, bundle: Path) -> dict[str, Any]:
    """Where an export comes from: a hash of the resolved config (every key and override; ``_meta_`` and
    ``bundle_root``, where the checkout happens to lie, left out, so the same run exported from another folder hashes
    the same), the git commit of the bundle's checkout when there is one, and the datalist's name with its training
    items per modality when the config names a readable datalist."""
    config = {k: v for k, v in (parser.get() or {}).items() if k not in ("_meta_", "bundle_root")}
    record: dict[str, Any] = {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "git_commit": _git_commit(bundle),
        "datalist": None,
    }
    try:
        datalist = Path(str(parser.get_parsed_content("datalist"))) if parser.get("datalist") else None
    except Exception:  # noqa: BLE001 - an unresolvable datalist expression: no datalist facts, the rest stands
        datalist = None
    if datalist is not None and datalist.is_file():
        try:
            items = json.loads(datalist.read_text()).get("training") or []
        except (OSError, ValueError, AttributeError):
            items = []
        counts: dict[str, int] = {}
        for item in items:
            modality = str(item.get("modality", "unknown")) if isinstance(item, dict) else "unknown"
            counts[modality] = counts.get(modality, 0) + 1
        record["datalist"] = {"name": datalist.name, "training_items_per_modality": dict(sorted(counts.items()))}
    return record


def _git_commit(path: Path) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def main(
    bundle: str,
    checkpoint: str,
    out: str,
    config: Any = None,
    encoder_id: str = "backbone",
    encoder_key: str = "backbone",
    preprocessing_id: str = "preprocessing_spec",
    method_key: str = "method",
    publish_url: str | None = None,
) -> None:
    """Export the encoder of CHECKPOINT (a file or a ckpt_dir) of BUNDLE to OUT (+ OUT's .json manifest).

    Args:
        bundle: the pretraining bundle's directory.
        checkpoint: a medssl training checkpoint, or a ckpt_dir (its latest complete checkpoint).
        out: the state dict file to write (e.g. encoder.pt); the manifest goes beside it (encoder.json).
        config: config file(s) of the bundle to parse (default: the run's run_config.json beside CHECKPOINT, else
            configs/train.json).
        encoder_id: config id of the backbone definition.
        encoder_key: module path of the encoder inside the method (prefix of its keys in the checkpoint).
        preprocessing_id: config id of the preprocessing description (skipped when absent).
        method_key: checkpoint entry holding the method's state dict.
        publish_url: where OUT and its manifest will be uploaded (a folder URL: https://... or file://...). The
            bundle's large_files.yml then lists both files under models/ with their URL and sha256, so that
            ``python -m monai.bundle download_large_files --bundle_path BUNDLE`` fetches them; upload the two files
            there yourself.
    """
    checkpoint_path = Path(checkpoint)
    if not Path(bundle).is_dir():  # before any note: a wrong --bundle is the one line the user sees
        raise FileNotFoundError(f"--bundle {bundle}: not a directory")
    if config is None:
        from medssl.engines.run_config import RUN_CONFIG_NAME, find_run_config

        run_config = find_run_config(checkpoint_path)
        if run_config is not None:
            config = [str(run_config)]
            print(f"note: parsing the run's config {run_config} (--config to parse other files)", file=sys.stderr)
        else:
            print(
                f"note: no {RUN_CONFIG_NAME} beside {checkpoint} (a run of an older medssl): parsing "
                "configs/train.json; pass --config with the run's config files if it had overrides",
                file=sys.stderr,
            )
    if checkpoint_path.is_dir():
        from medssl.engines.checkpoint import find_latest_checkpoint

        latest = find_latest_checkpoint(checkpoint_path)
        if latest is None:
            raise FileNotFoundError(f"--checkpoint {checkpoint}: the directory holds no complete checkpoint")
        checkpoint_path = latest
    manifest = build_manifest(bundle, config, encoder_id, preprocessing_id)
    if manifest["preprocessing"] is None:
        print(f"note: no config id {preprocessing_id!r}; the manifest records no preprocessing", file=sys.stderr)
    weights, manifest_path = export_encoder(
        checkpoint_path, out, encoder_key=encoder_key, method_key=method_key, manifest=manifest
    )
    written = json.loads(manifest_path.read_text())
    print(
        f"wrote {weights} ({written['num_tensors']} tensors, {written['num_params']} parameters, feature_dim "
        f"{written['feature_dim']}, spatial_dims {written['spatial_dims']}) and {manifest_path}"
    )
    if publish_url:
        large_files = publish_entries(Path(bundle), [weights, manifest_path], publish_url)
        print(f"listed {weights.name} and {manifest_path.name} at {publish_url} in {large_files}")


def publish_entries(bundle: Path, files: list[Path], url_base: str) -> Path:
    """Add or replace ``models/<name>`` entries (url = ``url_base/<name>``, sha256) in ``bundle/large_files.yml``,
    keeping its other entries and its leading comment lines. Returns the file's path."""
    import yaml

    from medssl.utils.io import file_sha256

    path = bundle / "large_files.yml"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    comments = [line for line in text.splitlines() if line.startswith("#")]
    data = yaml.safe_load(text) if text.strip() else None
    entries = list((data or {}).get("large_files") or [])
    for file in files:
        rel = f"models/{file.name}"
        entries = [e for e in entries if e.get("path") != rel]
        entries.append(
            {"path": rel, "url": url_base.rstrip("/") + "/" + file.name, "hash_val": file_sha256(file), "hash_type": "sha256"}
        )
    body = yaml.safe_dump({"large_files": entries}, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(comments + [body]) if comments else body, encoding="utf-8")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    run(main)
