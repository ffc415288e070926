"""Build and check medssl datalists (JSON lists of DICOM / NIfTI / NRRD / PNG / JPEG / TIFF images with modality).

Commands:
    python tools/datalist.py build --root DIR --out FILE [--modality MR] [--val-fraction 0.1] [--test-fraction 0.1]
    python tools/datalist.py check FILE [--dataset-dir D] [--report R.json] [--workers 4] [--skip-values]
    python tools/datalist.py vindr --csv train.csv --images DIR --out FILE [--suffix .dicom] [--classes A,B]

`check` also checks detection items' "boxes" / "labels" (inside the image, positive size, a known label: an index of
the datalist's "detection_classes"), one line per fault. It exits with status 1 when any item is bad, 0 otherwise.
A mistake on the command line (a missing folder or file, a datalist that is not JSON, a bad fraction, an unknown
modality) is one line `error: ...` with exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

from medssl.cli import run
from medssl.data.datalist import build_datalist, check_datalist, vindr_csv_to_datalist


def build(
    root: str,
    out: str,
    modality: str | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    name: str | None = None,
    progress_every: int = 1000,
) -> None:
    """Scan a folder of images and write a datalist JSON file.

    Finds NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), PNG / JPEG / TIFF / BMP, single DICOM files (.dcm or files
    with the DICM preamble) and DICOM series directories (one item per series). The modality comes from the DICOM
    Modality tag, else from --modality; dim (2 or 3) from the headers. Files that cannot be listed (unreadable, no
    modality, 4-D, broken series) are printed and recorded under "excluded". Paths are written relative to ROOT.

    Args:
        root: folder to scan recursively.
        out: datalist JSON file to write.
        modality: modality of items without a usable DICOM Modality tag (CT, MR, XR, US, NM, PT, MG, PATH, FUNDUS
            or an alias such as CR, DX, MRI, PET).
        val_fraction: fraction of the items put in the "validation" section.
        test_fraction: fraction of the items put in the "test" section.
        seed: seed of the random split.
        name: datalist name (default: the folder name).
        progress_every: print a progress line every this many files.
    """
    build_datalist(
        root,
        out,
        modality=modality,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        name=name,
        progress_every=progress_every,
    )


def check(
    datalist: str,
    dataset_dir: str | None = None,
    report: str | None = None,
    sections: str | None = None,
    workers: int = 0,
    skip_values: bool = False,
) -> None:
    """Open every item of a datalist and report the bad ones; exit status 1 if any item is bad, else 0.

    Detects missing files, unreadable / corrupt files (truncated NIfTI, non-DICOM .dcm), 4-D images, constant
    images, NaN / Inf values, zero or negative spacing, DICOM series with missing or duplicate slices, empty series
    directories, unknown modalities and a declared dim that disagrees with the file. Prints a per-modality /
    per-dimension summary and one line per bad item: "SECTION item N: PATH: PROBLEM".

    Args:
        datalist: the datalist JSON file.
        dataset_dir: directory that relative paths are resolved against (default: the datalist's "dataset_dir"
            entry, else its folder).
        report: also write a JSON report {"items": [...], "summary": {...}} to this file.
        sections: comma-separated sections to check (default: all of them).
        workers: check items in this many processes (0: in this process).
        skip_values: skip reading pixel values (faster, but misses truncated data, NaN / Inf and constant images).
    """
    if isinstance(sections, (list, tuple)):
        sections = ",".join(str(s) for s in sections)
    result = check_datalist(
        datalist, dataset_dir=dataset_dir, report=report, sections=sections, workers=workers, values=not skip_values
    )
    sys.exit(1 if result["summary"]["bad"] else 0)


def vindr(
    csv: str,
    images: str,
    out: str,
    suffix: str = ".dicom",
    classes: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> None:
    """A VinDr-CXR-style box CSV (image_id, class_name, x_min, y_min, x_max, y_max; one row per box, "No finding" or
    empty coordinates for an image without findings) into a detection datalist (boxes + labels per image).

    Args:
        csv: the CSV file.
        images: folder of the images, named <image_id><suffix>.
        out: datalist JSON file to write.
        suffix: the images' file suffix (VinDr-CXR: .dicom).
        classes: comma-separated class names in label order (default: the CSV's, sorted).
        val_fraction, test_fraction, seed: the seeded random split of the images.
    """
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else classes
    datalist = vindr_csv_to_datalist(csv, images, out, image_suffix=suffix, classes=names,
                                     val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    counts = ", ".join(f"{s} {len(datalist[s])}" for s in ("training", "validation", "test"))
    print(f"vindr: {out}: {counts} images, classes {datalist['detection_classes']}")


def main() -> None:
    run({"build": build, "check": check, "vindr": vindr})


if __name__ == "__main__":
    main()
