"""Datalist JSON I/O: read, validate, load (MONAI decathlon loader) and save datalists; sections and modality."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .formats import MODALITIES, SECTIONS, normalize_modality
from .inspect import inspect_image

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------------- load/save
def _read_json(path: os.PathLike | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: datalist file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a datalist is a JSON object with 'training' / 'validation' / 'test' lists")
    return raw


def resolve_dataset_dir(datalist_path: os.PathLike | str, dataset_dir: os.PathLike | str | None = None) -> str:
    """The directory that relative item paths of ``datalist_path`` are resolved against (see the module docstring)."""
    if dataset_dir is not None:
        return os.path.abspath(os.path.expanduser(str(dataset_dir)))
    folder = os.path.dirname(os.path.abspath(str(datalist_path)))
    try:
        stored = _read_json(datalist_path).get("dataset_dir")
    except ValueError:
        stored = None
    if isinstance(stored, str) and stored:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(stored)))
    return folder


def datalist_sections(raw: dict) -> list[str]:
    """Names of the item lists in a datalist (``training``, ``validation``, ``test`` and any other list of dicts,
    except ``excluded``)."""
    names = [s for s in SECTIONS if isinstance(raw.get(s), list)]
    for key, value in raw.items():
        if key in names or key == "excluded" or not isinstance(value, list):
            continue
        if value and all(isinstance(v, dict) for v in value):
            names.append(key)
    return names


def datalist_modality(raw: dict) -> tuple[str | None, str | None]:
    """The modality of the items that name none, from the datalist's top-level ``"modality"``: a code (``"CT"``) or
    the Medical Segmentation Decathlon's channel map (``{"0": "CT"}``; several channels must name one modality).

    Returns:
        (modality code or None, why the top-level entry gives none -- None when there is no entry)
    """
    value = raw.get("modality")
    if value is None:
        return None, None
    values = list(value.values()) if isinstance(value, dict) else [value]
    try:
        codes = {normalize_modality(v) for v in values}
    except ValueError:
        return None, f'the datalist\'s "modality" {value!r} is not one of {", ".join(MODALITIES)}'
    if len(codes) != 1:
        return None, f'the datalist\'s "modality" {value!r} names {len(codes)} modalities'
    return codes.pop(), None


def _validate_item(
    item: Any, section: str | None = None, default_modality: str | None = None
) -> tuple[dict, list[str]]:
    """Check one raw datalist item; returns (item with normalised modality / int dim, problems).

    A plain path is an item ``{"image": path}`` in ``"test"`` (the Medical Segmentation Decathlon's test list);
    ``default_modality`` (see :func:`datalist_modality`) fills a missing ``"modality"``.
    """
    if isinstance(item, str) and section == "test":
        item = {"image": item}
    if not isinstance(item, dict):
        hint = ' (plain paths are read in "test" only)' if isinstance(item, str) else ""
        return {}, [f'an item must be a JSON object such as {{"image": ...}}, got {type(item).__name__}{hint}']
    if "modality" not in item and default_modality is not None:
        item = {**item, "modality": default_modality}
    out, problems = dict(item), []
    image = item.get("image")
    if image is None or image == "" or image == []:
        problems.append('no "image"')
    elif not isinstance(image, (str, list)) or (isinstance(image, list) and not all(isinstance(i, str) for i in image)):
        problems.append(f'"image" must be a path (str), got {image!r}')
    if "modality" in item:
        try:
            out["modality"] = normalize_modality(item["modality"])
        except ValueError as e:
            problems.append(str(e))
    if "dim" in item:
        dim = item["dim"]
        if isinstance(dim, bool) or not isinstance(dim, (int, float)) or dim not in (2, 3):
            problems.append(f'"dim" must be 2 or 3, got {dim!r}')
        else:
            out["dim"] = int(dim)
    return out, problems


def load_datalist(
    path: os.PathLike | str, section: str = "training", dataset_dir: os.PathLike | str | None = None
) -> list[dict]:
    """Load one section of a datalist with ``monai.data.load_decathlon_datalist``.

    ``"image"`` and string ``"label"`` paths become absolute (resolved against the dataset directory, see the module
    docstring); ``"modality"`` is normalised to a code of ``MODALITIES`` (the datalist's top-level ``"modality"``
    for items without one); ``"dim"`` is an int, read from the image header (:func:`inspect_image`, no pixel values)
    for items without one; every other key keeps its JSON value (MONAI would turn a value such as ``"MR"`` into a
    path when a folder of that name exists). An empty section gives ``[]``.

    Raises:
        ValueError: "FILE SECTION item N: problem" for an item without ``"image"``, with an unknown modality or a
            bad ``dim``, or without ``dim`` and a header that gives none; "FILE: ..." for a missing file, invalid
            JSON, a missing section or a datalist without any item.
    """
    path = Path(path)
    raw = _read_json(path)
    _require_items(path, raw)
    if section not in raw or not isinstance(raw[section], list):
        found = ", ".join(datalist_sections(raw)) or "none"
        raise ValueError(f"{path}: no {section!r} list in the datalist (sections: {found})")
    if not raw[section]:
        return []
    default_modality, _ = datalist_modality(raw)
    checked = []
    for index, item in enumerate(raw[section]):
        fixed, problems = _validate_item(item, section, default_modality)
        if problems:
            raise ValueError(f"{path} {section} item {index}: {'; '.join(problems)}")
        checked.append(fixed)
    from monai.data import load_decathlon_datalist  # imported here: the datalist tools need no torch / MONAI

    base_dir = resolve_dataset_dir(path, dataset_dir)
    resolved = load_decathlon_datalist(path, is_segmentation=True, data_list_key=section, base_dir=base_dir)
    for item, raw_item in zip(resolved, checked):
        for key, value in raw_item.items():
            if key == "image" or (key == "label" and isinstance(value, (str, list))):
                continue
            item[key] = value
    _infer_dims(resolved, path, section)
    return resolved


def _require_items(path: os.PathLike | str, raw: dict, sections: Sequence[str] | None = None) -> None:
    """Raise the one-line error of a datalist without any item (in ``sections``, default: all of its lists)."""
    sections = list(sections) if sections is not None else datalist_sections(raw) or list(SECTIONS)
    if any(isinstance(raw.get(s), list) and raw[s] for s in sections):
        return
    found = ", ".join(f"{s} {len(raw[s]) if isinstance(raw.get(s), list) else 'absent'}" for s in sections)
    raise ValueError(
        f"{path}: the datalist has no items ({found}); list images under \"training\" "
        "(python tools/datalist.py build --root DIR --out FILE writes one)"
    )


def _infer_dims(items: list[dict], path: os.PathLike | str, section: str) -> None:
    """Fill the ``"dim"`` of the items that have none (Medical Segmentation Decathlon style lists) from the image
    headers (:func:`inspect_image` without pixel values), in place.

    Raises:
        ValueError: naming the item and its file when the header cannot give a dim of 2 or 3.
    """
    counts: Counter = Counter()
    for index, item in enumerate(items):
        if item.get("dim") is not None:
            continue
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        info = inspect_image(image, values=False, series_uid=item.get("series_uid"))
        if info["dim"] not in (2, 3):
            reason = "; ".join(info["problems"]) or f"a {info['dim']}-D image"
            raise ValueError(
                f'{path} {section} item {index}: no "dim", and the header of {image} gives none ({reason}); fix or '
                f'remove the item, or give its "dim" (python tools/datalist.py check {path} lists every bad item)'
            )
        item["dim"] = int(info["dim"])
        counts[item["dim"]] += 1
    if counts:
        found = ", ".join(f"{dim}D: {n}" for dim, n in sorted(counts.items()))
        n = sum(counts.values())
        logger.info('%s [%s]: "dim" read from the image headers of %d items (%s)', path, section, n, found)


def _relative(path: str, base: str | None) -> str:
    if base is None or not os.path.isabs(path):
        return path
    relative = os.path.relpath(path, base)
    return path if relative.startswith("..") else Path(relative).as_posix()


def save_datalist(
    path: os.PathLike | str,
    training: Sequence[dict],
    validation: Sequence[dict] | None = None,
    test: Sequence[dict] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    classes: Sequence[str] | None = None,
    dataset_dir: os.PathLike | str | None = None,
    **extra: Any,
) -> Path:
    """Write a datalist JSON file (format in the module docstring) and return its path.

    Items are validated like :func:`load_datalist` (modality normalised, ``dim`` 2 or 3). When ``dataset_dir`` is
    given, absolute ``image`` / string ``label`` paths inside it are written relative to it, and the datalist records
    ``"dataset_dir"`` relative to its own folder, so ``load_datalist(path)`` finds the images again.
    ``extra`` keys (e.g. ``excluded``) are written as they are.
    """
    path = Path(path)
    base = os.path.abspath(str(dataset_dir)) if dataset_dir is not None else None
    out: dict[str, Any] = {}
    if name is not None:
        out["name"] = name
    if description is not None:
        out["description"] = description
    if classes is not None:
        out["classes"] = list(classes)
    if base is not None:
        folder = os.path.dirname(os.path.abspath(str(path)))
        relative = (
            os.path.relpath(base, folder) if os.path.splitdrive(base)[0] == os.path.splitdrive(folder)[0] else base
        )
        out["dataset_dir"] = Path(relative).as_posix()
    for section, items in (("training", training), ("validation", validation), ("test", test)):
        if items is None:
            continue
        written = []
        for index, item in enumerate(items):
            fixed, problems = _validate_item(item)
            if problems:
                raise ValueError(f"{path} {section} item {index}: {'; '.join(problems)}")
            fixed["image"] = (
                [_relative(str(i), base) for i in fixed["image"]]
                if isinstance(fixed["image"], list)
                else _relative(str(fixed["image"]), base)
            )
            if isinstance(fixed.get("label"), str):
                fixed["label"] = _relative(fixed["label"], base)
            written.append(fixed)
        out[section] = written
    out.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return path


# ------------------------------------------------------------------------------------------------------ messages
def _progress(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


_MAX_WARNING_LINES = 20


def _print_warnings(warnings: Sequence[tuple[str, str]], print_fn: Callable[[str], Any], where: str) -> None:
    """Print ``"warning: WHAT: MESSAGE"`` lines, at most ``_MAX_WARNING_LINES`` (then where the rest is)."""
    for what, message in warnings[:_MAX_WARNING_LINES]:
        print_fn(f"warning: {what}: {message}")
    if len(warnings) > _MAX_WARNING_LINES:
        print_fn(f"warning: ... and {len(warnings) - _MAX_WARNING_LINES} more (all in {where})")
