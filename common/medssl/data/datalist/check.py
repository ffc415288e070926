"""Check every item of a datalist in parallel worker processes: missing, corrupt and unusable images."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .boxes import box_problems, has_boxes
from .formats import MODALITIES, normalize_modality
from .inspect import inspect_image
from .io import (
    _print_warnings,
    _progress,
    _read_json,
    _require_items,
    _validate_item,
    datalist_modality,
    datalist_sections,
    resolve_dataset_dir,
)


# ------------------------------------------------------------------------------------------------------------ check
def _check_item(task: dict) -> dict:
    """Check one datalist item (picklable, for process pools); see :func:`check_datalist`."""
    problems = list(task["problems"])
    result = {
        "section": task["section"],
        "index": task["index"],
        "image": task["image"],
        "ok": False,
        "error": None,
        "warnings": [],
        "format": None,
        "dim": None,
        "shape": None,
        "spacing": None,
        "modality": task["modality"],
        "declared_dim": task["dim"],
    }
    image = task["image"]
    if isinstance(image, str):
        info = inspect_image(image, values=task["values"], series_uid=task.get("series_uid"))
        problems += info["problems"]
        result["warnings"] = list(info["warnings"])
        result.update({k: info[k] for k in ("format", "dim", "shape", "spacing")})
        declared = task["dim"]
        if declared in (2, 3) and info["dim"] in (2, 3) and int(declared) != info["dim"]:
            problems.append(
                f"the datalist declares dim={declared} but the file is {info['dim']}-D (shape {info['shape']})"
            )
        tag = info.get("modality")
        if tag and task["modality"] in MODALITIES:
            try:
                tag_code = normalize_modality(tag)
            except ValueError:
                tag_code = None
            if tag_code is not None and tag_code != task["modality"]:
                problems.append(
                    f"the datalist declares modality {task['modality']} but the DICOM Modality tag is {tag}"
                )
    elif isinstance(image, list):
        problems.append("multi-file items (a list of images) are not checked")
    if task.get("detection"):  # boxes inside the image, positive size, known labels (data/datalist/boxes.py)
        faults = box_problems(task.get("boxes"), task.get("labels"), result["shape"], task.get("num_classes"))
        result["box_problems"] = faults  # printed one line each
        problems += faults
    result["ok"] = not problems
    result["error"] = "; ".join(problems) if problems else None
    return result


def _check_tasks(raw: dict, base_dir: str, sections: Sequence[str], values: bool) -> list[dict]:
    tasks = []
    default_modality, why_not = datalist_modality(raw)
    classes = raw.get("detection_classes")
    num_classes = len(classes) if isinstance(classes, list) else None
    for section in sections:
        for index, item in enumerate(raw.get(section) or []):
            fixed, problems = _validate_item(item, section, default_modality)
            image = fixed.get("image")
            if isinstance(image, str) and image:
                image = os.path.normpath(os.path.join(base_dir, os.path.expanduser(image)))
            elif not isinstance(image, list):
                image = None
            modality = fixed.get("modality")
            if fixed and "modality" not in fixed:
                problems.append(
                    f'no modality: add "modality" ({", ".join(MODALITIES)}) to the item, or one top-level '
                    '"modality" for the whole datalist' + (f" ({why_not})" if why_not else "")
                )
            tasks.append(
                {
                    "section": section,
                    "index": index,
                    "image": image,
                    "modality": modality,
                    "dim": fixed.get("dim"),
                    "series_uid": fixed.get("series_uid"),
                    "problems": problems,
                    "values": values,
                    "detection": has_boxes(item),
                    "boxes": item.get("boxes") if isinstance(item, dict) else None,
                    "labels": item.get("labels") if isinstance(item, dict) else None,
                    "num_classes": num_classes,
                }
            )
    return tasks


def _summary(results: Sequence[dict]) -> dict:
    by_section: dict[str, dict] = {}
    by_group: dict[str, dict] = {}
    inferred: Counter = Counter()
    for r in results:
        if r.get("declared_dim") is None and r["dim"] in (2, 3):
            inferred[f"{r['dim']}D"] += 1
        section = by_section.setdefault(r["section"], {"items": 0, "bad": 0})
        section["items"] += 1
        section["bad"] += 0 if r["ok"] else 1
        dim = r["dim"] or r.get("declared_dim")
        key = f"{r['modality'] or '?'} {f'{dim}D' if dim else '?D'}"
        group = by_group.setdefault(key, {"items": 0, "bad": 0})
        group["items"] += 1
        group["bad"] += 0 if r["ok"] else 1
    n_bad = sum(0 if r["ok"] else 1 for r in results)
    return {
        "items": len(results),
        "ok": len(results) - n_bad,
        "bad": n_bad,
        "warned": sum(1 for r in results if r.get("warnings")),
        "dim_from_header": dict(sorted(inferred.items())),
        "sections": by_section,
        "modality_dim": dict(sorted(by_group.items())),
    }


def check_datalist(
    path: os.PathLike | str,
    dataset_dir: os.PathLike | str | None = None,
    report: os.PathLike | str | None = None,
    sections: Sequence[str] | str | None = None,
    workers: int = 0,
    values: bool = True,
    progress_every: int = 200,
    verbose: bool = True,
    print_fn: Callable[[str], Any] = print,
) -> dict:
    """Open every item of a datalist and report the ones that training could not use.

    Detected per item: missing file; unreadable / corrupt file (e.g. a truncated ``.nii.gz``, a text file named
    ``.dcm``); a 4-D (or higher) image where a 2-D image or 3-D volume is expected; a constant image; NaN / Inf
    values; zero, negative or non-finite spacing; a DICOM series with missing slices (gap in the slice positions) or
    duplicate slices (same position), mixed orientations or several series in one directory; an empty series
    directory; a missing or unknown modality, or one that contradicts the DICOM Modality tag; a declared ``dim``
    that disagrees with the file. Items without ``dim`` get it from the header, as :func:`load_datalist` does (the
    summary counts them). Zero or missing spacing is a warning, not a problem: the readers use 1 mm. A datalist
    without any item is an error. Headers are read without pixel data where the format allows; the value checks
    (NaN / Inf, constant image, truncated data) read the pixel values once, cheaply -- see
    :func:`medssl.data.readers.inspect_image` for the trade-off; ``values=False`` skips them.

    Prints a summary per section and per modality / dimension, then one line per bad item:
    ``"SECTION item N: PATH: PROBLEM"``, then up to 20 ``"warning: SECTION item N: PATH: WARNING"`` lines.

    Args:
        path: the datalist JSON file.
        dataset_dir: directory of relative paths (default: see the module docstring).
        report: write the report as JSON to this path.
        sections: sections to check (list or comma-separated string; default: every item list in the file).
        workers: check items in this many processes (0 or 1: in this process).
        values: read pixel values for the NaN / Inf, constant-image and truncation checks.
        progress_every: print a progress line to stderr every this many items (0: never).
        verbose: print the summary and the bad items.
        print_fn: where the summary lines go.

    Returns:
        ``{"datalist", "dataset_dir", "items": [{"section", "index", "image", "ok", "error", "warnings", "format",
        "dim", "shape", "spacing", "modality", "declared_dim"}, ...], "summary": {"items", "ok", "bad", "warned",
        "dim_from_header", "sections", "modality_dim"}}`` -- ``dim`` / ``shape`` / ``spacing`` are read from the
        file (None when unreadable), ``modality`` and ``declared_dim`` come from the datalist; ``modality_dim`` counts
        items per "MODALITY nD" (the file's dim, else the declared one); ``dim_from_header`` counts the items without
        a declared ``dim`` per "nD"; ``warned`` the items with warnings.
    """
    path = os.path.abspath(str(path))
    raw = _read_json(path)
    base_dir = resolve_dataset_dir(path, dataset_dir)
    if isinstance(sections, str):
        sections = [s.strip() for s in sections.split(",") if s.strip()]
    sections = list(sections) if sections else datalist_sections(raw)
    missing = [s for s in sections if not isinstance(raw.get(s), list)]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} list in the datalist (sections: {datalist_sections(raw)})")
    _require_items(path, raw, sections or None)
    tasks = _check_tasks(raw, base_dir, sections, values)

    results: list[dict] = []

    def collect(iterator: Iterable[dict]) -> None:
        for result in iterator:
            results.append(result)
            if verbose and progress_every and len(results) % progress_every == 0:
                _progress(f"check_datalist: {len(results)}/{len(tasks)} items checked", verbose)

    if workers and workers > 1 and len(tasks) > 1:
        chunk = max(1, min(16, math.ceil(len(tasks) / (4 * workers))))
        with ProcessPoolExecutor(max_workers=int(workers)) as pool:
            collect(pool.map(_check_item, tasks, chunksize=chunk))
    else:
        collect(map(_check_item, tasks))

    output = {"datalist": path, "dataset_dir": base_dir, "items": results, "summary": _summary(results)}
    if report is not None:
        report_path = Path(report)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(output, f, indent=2)
            f.write("\n")
    if verbose:
        summary = output["summary"]
        per_section = ", ".join(f"{k} {v['items']}" for k, v in summary["sections"].items())
        warned = f" ({summary['warned']} with warnings)" if summary["warned"] else ""
        print_fn(
            f"check_datalist: {path}: {summary['items']} items ({per_section or 'none'}), "
            f"{summary['ok']} ok{warned}, {summary['bad']} bad"
        )
        for key, group in summary["modality_dim"].items():
            count = f"{group['items']} item" + ("s" if group["items"] != 1 else "")
            print_fn(f"  {key}: {count}" + (f" ({group['bad']} bad)" if group["bad"] else ""))
        if summary["dim_from_header"]:
            found = ", ".join(f"{k}: {v}" for k, v in summary["dim_from_header"].items())
            print_fn(f'  "dim" read from the image headers (as the bundles do at load): {found}')
        for r in results:
            if not r["ok"]:
                shown = r["image"] if r["image"] is not None else "(no image)"
                faults = r.get("box_problems") or []
                other = [p for p in r["error"].split("; ") if p not in faults] if faults else [r["error"]]
                for line in (["; ".join(other)] if other else []) + faults:
                    print_fn(f"{r['section']} item {r['index']}: {shown}: {line}")
        _print_warnings(
            [(f"{r['section']} item {r['index']}: {r['image']}", w) for r in results for w in r.get("warnings") or []],
            print_fn,
            "--report",
        )
        if report is not None:
            print_fn(f"check_datalist: report written to {report}")
    return output
