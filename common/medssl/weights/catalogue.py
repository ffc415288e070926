"""The weights catalogue: published encoders medssl supports, by name (``medssl/weights/catalogue.json``).

Each entry gives the name, family (which converter), official URL, sha256, licence, paper, input convention,
preprocessing and converter options. :func:`fetch_encoder` downloads an entry's checkpoint, checks its hash,
converts it to a medssl encoder file + manifest and caches the result under ``<cache>/catalogue/<name>/encoder.pt``
(``<cache>``: :func:`medssl.weights.download.default_weights_cache`); a second call reuses it without downloading.

The authors publish no sha256 for these files, so the shipped entries have ``"sha256": null``: the first fetch prints
the hash it computed and records it in ``<cache>/catalogue/<name>/source.sha256`` (with a warning that the file was
not checked against a published hash); later downloads must match the recorded hash. ``sha256=`` pins it.

The catalogue file is ``$MEDSSL_WEIGHTS_CATALOGUE`` when set (tests point it at ``file://`` mirrors), else the
shipped one. Command line: ``tools/weights.py list`` / ``tools/weights.py fetch NAME``; every downstream bundle's
``--pretrained_path NAME`` resolves through :func:`fetch_encoder`.
"""

# Ours, not torch.hub.load_state_dict_from_url: that only downloads; this converts to medssl's layout, writes a
# manifest and carries each entry's preprocessing.

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medssl.cli import as_sha256
from medssl.utils.imports import locate
from medssl.utils.io import atomic_write_text

from .download import default_weights_cache, download_file
from .export import _listing, manifest_path_for

__all__ = ["CATALOGUE_ENV", "CONVERTERS", "REQUIRED_FIELDS", "catalogue_path", "load_catalogue", "is_catalogue_name",
           "cached_encoder", "fetch_encoder"]

logger = logging.getLogger(__name__)

CATALOGUE_ENV = "MEDSSL_WEIGHTS_CATALOGUE"
_SHIPPED = Path(__file__).with_name("catalogue.json")
#: family -> converter ``f(checkpoint, out, **entry["converter"]) -> (weights, manifest, report)``, located by name
#: when used (a converter that is not installed fails only for its own entries)
CONVERTERS = {
    "swav": "medssl.weights.convert_swav.convert_swav_checkpoint",
    "dino": "medssl.weights.convert_dino.convert_dino_checkpoint",
    "unimiss": "medssl.weights.convert_unimiss.convert_unimiss_checkpoint",
}
REQUIRED_FIELDS = ("name", "family", "url", "sha256", "licence", "paper", "input", "preprocessing", "converter",
                   "notes")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def catalogue_path(path: str | Path | None = None) -> Path:
    """``path``, else ``$MEDSSL_WEIGHTS_CATALOGUE``, else the shipped ``medssl/weights/catalogue.json``."""
    return Path(path or os.environ.get(CATALOGUE_ENV) or _SHIPPED).expanduser()


def _check_entry(entry: Any, where: str) -> str:
    """The entry's name; a one-line ``ValueError`` naming the entry for a missing field or a bad value."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: not a JSON object")
    name = entry.get("name")
    where = f"{where} ({name})" if name else where
    missing = [f for f in REQUIRED_FIELDS if f not in entry]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: name {name!r} must be letters, digits, '_' or '-' (it is used as a folder name)")
    if entry["family"] not in CONVERTERS:
        raise ValueError(f"{where}: unknown family {entry['family']!r} (known: {', '.join(sorted(CONVERTERS))})")
    url = entry["url"]
    if url is None:
        if not entry.get("download_page"):
            raise ValueError(f"{where}: url is null and there is no download_page")
    elif not isinstance(url, str) or urlparse(url).scheme not in ("http", "https", "file"):
        raise ValueError(f"{where}: url {url!r} is not an http(s):// or file:// URL")
    try:
        as_sha256(entry["sha256"], f"{where} sha256")
    except ValueError as e:
        raise ValueError(str(e)) from None
    if not isinstance(entry["converter"], dict):
        raise ValueError(f"{where}: converter must be an object of converter options")
    return name


def load_catalogue(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Name -> entry of the catalogue at :func:`catalogue_path` (``path``), validated: a missing field, an unknown
    family, a bad URL or sha256, or a repeated name is a one-line ``ValueError`` naming the entry."""
    file = catalogue_path(path)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"weights catalogue {file}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"weights catalogue {file}: not valid JSON ({e})") from None
    entries = doc.get("encoders") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"weights catalogue {file}: no 'encoders' list")
    catalogue: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        name = _check_entry(entry, f"weights catalogue {file}: entry {i}")
        if name in catalogue:
            raise ValueError(f"weights catalogue {file}: entry {i} ({name}): the name is used twice")
        catalogue[name] = dict(entry)
    return catalogue


def is_catalogue_name(path: Any, catalogue: str | Path | None = None) -> bool:
    """Whether ``path`` reads as a catalogue name (no path separator, no suffix) that the catalogue holds."""
    text = str(path)
    if not isinstance(path, (str, Path)) or "/" in text or os.sep in text or Path(text).suffix or not _NAME.match(text):
        return False
    return text in load_catalogue(catalogue)


def _entry(name: str, catalogue: str | Path | dict | None) -> dict[str, Any]:
    entries = catalogue if isinstance(catalogue, dict) else load_catalogue(catalogue)
    if name not in entries:
        where = "" if isinstance(catalogue, dict) else f" {catalogue_path(catalogue)}"
        raise ValueError(
            f"{name!r} is not in the weights catalogue{where}; known: {_listing(sorted(entries))} (tools/weights.py list)"
        )
    return entries[name]


def cached_encoder(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`fetch_encoder` caches ``name``'s encoder file (it may not exist yet)."""
    return Path(cache_dir or default_weights_cache()) / "catalogue" / name / "encoder.pt"


def _recorded(folder: Path) -> str | None:
    file = folder / "source.sha256"
    return file.read_text().split()[0].lower() if file.is_file() and file.read_text().strip() else None


def fetch_encoder(
    name: str,
    cache_dir: str | Path | None = None,
    sha256: str | int | None = None,
    catalogue: str | Path | dict | None = None,
    force: bool = False,
) -> Path:
    """The converted encoder file of catalogue entry ``name`` (its manifest ``encoder.json`` beside it).

    Downloaded, checked, converted and cached under ``<cache_dir>/catalogue/<name>/`` on the first call; later calls
    return the cached file without downloading (``force``: download and convert again). The expected hash of the
    downloaded checkpoint is ``sha256``, else the entry's, else the one recorded by the first fetch; with none the
    computed hash is recorded (with a warning). Errors are one line: an unknown name (the known ones listed), a
    failed download or a hash mismatch (the URL named; nothing cached), an entry without a direct URL (what to do).
    """
    entry = _entry(name, catalogue)
    folder = cached_encoder(name, cache_dir).parent
    encoder = folder / "encoder.pt"
    pinned = as_sha256(sha256, "sha256") or as_sha256(entry["sha256"], f"{name} sha256")
    recorded = _recorded(folder)
    expected, expected_from = pinned, ("the given sha256" if sha256 else "the catalogue's sha256")
    if not expected and recorded:
        expected, expected_from = recorded, f"the sha256 recorded by the first fetch ({folder / 'source.sha256'})"
    if encoder.is_file() and manifest_path_for(encoder).is_file() and not force:
        if not pinned or pinned == recorded:
            return encoder
    url = entry["url"]
    if url is None:
        raise ValueError(
            f"{name}: no direct download URL; download the checkpoint by hand from {entry['download_page']} and "
            f"convert it with `python tools/convert_weights.py {entry['family']} CKPT --out encoder.pt`, then use "
            "--pretrained_path encoder.pt"
        )
    converter = locate(CONVERTERS[entry["family"]], f"weights catalogue entry {name}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch.") as tmp:
            source = Path(tmp) / (os.path.basename(urlparse(url).path) or f"{name}.pth")
            print(f"downloading {url}", flush=True)
            actual = download_file(url, source, expected, expected_from=expected_from)
            if not expected:
                logger.warning(
                    f"{name}: {url} has sha256 {actual}; it was not checked against a published hash (none is "
                    f"published); recorded in {folder / 'source.sha256'}, later downloads must match it"
                )
            out = Path(tmp) / "out" / "encoder.pt"
            out.parent.mkdir()
            _, manifest_file, _ = converter(source, out, **entry["converter"])
            manifest = json.loads(Path(manifest_file).read_text(encoding="utf-8"))
            manifest["catalogue"] = {k: entry.get(k) for k in ("name", "url", "licence", "paper", "preprocessing")}
            manifest["catalogue"]["source_sha256"] = actual
            atomic_write_text(manifest_file, json.dumps(manifest, indent=2) + "\n")
            for file in sorted(out.parent.iterdir(), key=lambda f: f.suffix == ".json"):  # the manifest last
                os.replace(file, folder / file.name)
            if not recorded or recorded != actual:
                atomic_write_text(folder / "source.sha256", f"{actual}  {url}\n")
    except BaseException:
        if not any(folder.iterdir()):  # nothing cached: no empty folder left either
            folder.rmdir()
        raise
    return encoder
