"""What the demo dataset holds: its version, class and mask names, task datalists, and the catalogue of real
files shipped inside installed packages (:class:`RealSource`, :data:`REAL_SOURCES`)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

#: Bumped whenever the content of a build changes; a datalist built by another version is rebuilt.
DEMO_VERSION = "3"
#: Class names of the 2D classification items (``label`` = index into this list).
CLASSES = ("normal", "nodule", "effusion")
#: Names of the values of the segmentation masks, per modality of the masked items (``mask == i`` is
#: ``MASK_CLASSES[modality][i]``); written to the datalist as ``"mask_classes"``. XR: JSRT / SCR-style chest
#: organs (both lungs one class; a clavicle pixel over a lung is ``clavicles``).
MASK_CLASSES = {
    "CT": ("background", "liver", "lesion"),
    "MR": ("background", "brain", "lesion"),
    "US": ("background", "lesion"),
    "XR": ("background", "lungs", "heart", "clavicles"),
}
#: The same as a value -> name mapping (the datalist's ``"segmentation_labels"``).
SEGMENTATION_LABELS = {
    modality: {str(i): name for i, name in enumerate(names)} for modality, names in MASK_CLASSES.items()
}
#: Classes used by the class-labelled CT volumes (indices into ``CLASSES``): 0 normal, 1 nodule.
CT_VOLUME_CLASSES = (0, 1)
#: Task datalists written next to ``datalist.json``: file name -> which items they keep.
TASK_DATALISTS = {
    "datalist_classification_2d.json": "2D items whose label is a class index",
    "datalist_segmentation_2d.json": "2D items whose label is a mask path",
    "datalist_segmentation_3d.json": "3D items whose label is a mask path",
    "datalist_classification_3d.json": "3D items whose label is a class index",
}
SECTIONS = ("training", "validation", "test")
MAX_2D_SIZE = 128  # largest side of a 2D image after downscaling
_UID_ENTROPY = "medssl-demo"


_LICENCE_PYDICOM = (
    "MIT (pydicom licence); pydicom/data/test_files/README.txt: 'I believe there is no restriction on "
    "using any of these files in this manner'"
)
_LICENCE_PYDICOM_DATA = "MIT (pydicom-data licence); file notes in pydicom/data/test_files/README.txt"


# --------------------------------------------------------------------------------------------------
# real files shipped in installed packages
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealSource:
    """One real image that ships inside an installed distribution.

    Attributes:
        name: output file stem under ``real/``.
        distribution: pip distribution name (``importlib.metadata``), e.g. ``"pydicom-data"``.
        path: path of the file relative to the distribution's install root (site-packages).
        modality: canonical modality code of the item.
        dim: spatial dimensions after loading (2 or 3).
        kind: how it is written: ``"copy"`` (bytes), ``"dicom2d"`` (downscaled uncompressed DICOM),
            ``"png"`` (downscaled PNG), ``"nifti"`` (NIfTI, 3-D, in-plane downscaled to <= 64).
        licence: licence of the file as the package states it.
        origin: where the package says the image comes from.
        alternatives: (distribution, path, licence) of equivalent files tried, in order, when the
            first one is not installed (e.g. a compressed twin in a package that is always there).
    """

    name: str
    distribution: str
    path: str
    modality: str
    dim: int
    kind: str
    licence: str
    origin: str
    alternatives: tuple[tuple[str, str, str], ...] = ()

    def locate(self) -> tuple[str, str, str, Path] | None:
        """(distribution, path, licence, file on disk) of the first candidate installed, or None.

        Only looks on disk (``importlib.metadata``); never imports the package or downloads anything.
        """
        for distribution, relative, licence in ((self.distribution, self.path, self.licence), *self.alternatives):
            try:
                dist = importlib.metadata.distribution(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
            path = Path(str(dist.locate_file(relative)))
            if path.is_file():
                return distribution, relative, licence, path
        return None

    def output_name(self) -> str:
        suffix = {"copy": Path(self.path).suffix, "dicom2d": ".dcm", "png": ".png", "nifti": ".nii.gz"}[self.kind]
        return f"{self.name}{suffix}"


REAL_SOURCES: tuple[RealSource, ...] = (
    RealSource(
        "ct_small", "pydicom", "pydicom/data/test_files/CT_small.dcm", "CT", 2, "copy", _LICENCE_PYDICOM,
        "CT slice downsized to 128x128 from NEMA WG04 'CT1_UNC'",
    ),
    RealSource(
        "ct_head_693", "pydicom-data", "data_store/data/693_UNCR.dcm", "CT", 2, "dicom2d", _LICENCE_PYDICOM_DATA,
        "head CT 512x512, pydicom issue #693 regression dataset",
    ),
    RealSource(
        "mr_small", "pydicom", "pydicom/data/test_files/MR_small.dcm", "MR", 2, "copy", _LICENCE_PYDICOM,
        "MR slice downsized to 64x64 from NEMA WG04 'MR1_UNC'",
    ),
    RealSource(
        "mr_shoulder_mr2", "pydicom-data", "data_store/data/MR2_UNCR.dcm", "MR", 2, "dicom2d",
        _LICENCE_PYDICOM_DATA, "MR 1024x1024 from NEMA WG04 'MR2'",
    ),
    RealSource(
        "cr_chest_rg1", "pydicom-data", "data_store/data/RG1_UNCR.dcm", "XR", 2, "dicom2d", _LICENCE_PYDICOM_DATA,
        "chest computed radiograph (CR, MONOCHROME1) 1955x1841 from NEMA WG04 'RG1'",
    ),
    RealSource(
        "cr_extremity_rg3", "pydicom-data", "data_store/data/RG3_UNCR.dcm", "XR", 2, "dicom2d",
        _LICENCE_PYDICOM_DATA, "extremity computed radiograph (CR, MONOCHROME1) 1760x1760 from NEMA WG04 'RG3'",
    ),
    RealSource(
        "us_rgb_color", "pydicom", "pydicom/data/test_files/examples_rgb_color.dcm", "US", 2, "dicom2d",
        _LICENCE_PYDICOM, "colour-Doppler ultrasound (RGB), crop of NEMA WG04 'US1'",
    ),
    RealSource(
        "us_aloka", "pydicom-data", "data_store/data/gdcm-US-ALOKA-16.dcm", "US", 2, "dicom2d",
        "BSD-3-Clause (GDCM licence, reproduced in pydicom/data/test_files/README.txt)",
        "ultrasound with 16-bit segmented palette colour from GDCM; palette applied -> RGB",
    ),
    RealSource(
        "nm_whole_body", "pydicom-data", "data_store/data/JPEG2000_UNC.dcm", "NM", 2, "dicom2d",
        _LICENCE_PYDICOM_DATA, "whole-body nuclear-medicine image 1024x256 from NEMA WG04 'NM1'",
        # the JPEG 2000 twin in pydicom itself (decoded by pillow's OpenJPEG) when pydicom-data is absent
        alternatives=(("pydicom", "pydicom/data/test_files/JPEG2000.dcm", _LICENCE_PYDICOM),),
    ),
    RealSource(
        "path_ihc", "scikit-image", "skimage/data/ihc.png", "PATH", 2, "png",
        "BSD-3-Clause (scikit-image); skimage.data docstring: 'No known copyright restrictions'",
        "immunohistochemistry (DAB + haematoxylin) of colonic glands, CMMI (skimage.data.immunohistochemistry)",
    ),
    RealSource(
        "fundus_retina", "scikit-image", "skimage/data/retina.jpg", "FUNDUS", 2, "png",
        "CC0 1.0 (skimage.data.retina docstring; Wikimedia 'Fundus photograph of normal left eye')",
        "fundus photograph 1411x1411, M. Haggstrom (skimage.data.retina)",
    ),
    RealSource(
        "fundus_microaneurysms", "scikit-image", "skimage/data/microaneurysms.png", "FUNDUS", 2, "copy",
        "CC0 (skimage.data.microaneurysms docstring, given by the owner A. Maier)",
        "green channel crop of HRF database image 07_dr.JPG (skimage.data.microaneurysms)",
    ),
    RealSource(
        "mr_anatomical", "nibabel", "nibabel/tests/data/anatomical.nii", "MR", 3, "nifti",
        "MIT (nibabel licence, no separate data notice)", "low-resolution T1 brain volume, nibabel test data",
    ),
    RealSource(
        "mr_example4d_vol0", "nibabel", "nibabel/tests/data/example4d.nii.gz", "MR", 3, "nifti",
        "MIT (nibabel licence, no separate data notice)", "first volume of a 4-D fMRI (EPI) series, nibabel",
    ),
    RealSource(
        "mr_aniso_vox", "dipy", "dipy/data/files/aniso_vox.nii.gz", "MR", 3, "nifti",
        "BSD-3-Clause (dipy licence, no separate data notice)", "brain MR with anisotropic voxels (dipy 'aniso_vox')",
    ),
)

