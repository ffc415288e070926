"""Atomic file writes, file hashes and JSON-safe values: every medssl output file goes through :func:`atomic_write`.

* :func:`atomic_write` / :func:`atomic_torch_save` / :func:`atomic_write_text`: a temp file in the target's folder,
  flushed, fsynced and ``os.replace``-d onto the target, so a reader (or a resumed run) never sees half a file;
* :func:`file_sha256`: the hex sha256 of a file's bytes (encoder files, checkpoints, downloads, the demo data);
* :func:`json_safe`: a value ``json.dumps`` writes as strict JSON (NaN / inf become null).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write", "atomic_torch_save", "atomic_write_text", "file_sha256", "json_safe", "ENCODER_MANIFEST_FORMAT",
]

#: the ``format`` of an encoder manifest (``encoder.json`` beside ``encoder.pt``); read by medssl.weights, written
#: there and by the stages that save encoders themselves (MedCoSS)
ENCODER_MANIFEST_FORMAT = "medssl-encoder/1"


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills ``.<name>.tmp.<pid>`` (a binary file) in the same directory
    (created if needed), which is flushed, fsynced and ``os.replace``-d onto ``path``; then the directory is fsynced.
    On any error the temp file is removed and the error re-raised; ``path`` is then untouched (the previous file, if
    any, stays whole). Every medssl output file (checkpoints, encoder files, caches, reports, figures) goes through
    this function."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort: not every OS / file system allows opening a directory)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch  # on use: light tools (prepare_medmnist's JSON writes) use this module without loading torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# Ours, not monai.apps.utils.check_hash: that compares a file with a known hash; manifests need the digest itself.
def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: a NaN / inf float becomes None (null: JSON has no literal for them), NumPy
    scalars become Python numbers, mappings become dicts with ``str`` keys and tuples lists (recursively); anything
    else is returned as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value
