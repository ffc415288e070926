"""medssl.data.readers: per-format MONAI readers, HU rescaling, RAS orientation, spacing, channels, read errors."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medssl.data.readers import (
    EnsureChannelsd,
    ImageReadError,
    LoadMedicalImaged,
    image_format,
    inspect_image,
    load_medical_image,
    sort_dicom_slices,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(
    path,
    pixels,
    modality="CT",
    position=None,
    instance=1,
    series_uid=None,
    slope=None,
    intercept=None,
    spacing=(0.7, 0.8),
    photometric="MONOCHROME2",
    sop_class=CTImageStorage,
):
    """A minimal uncompressed 16-bit DICOM file; ``pixels`` is (Rows, Columns) of stored values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [float(s) for s in spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_ct_series(directory, z_positions, instance_numbers=None, slope=2.0, intercept=-1024.0, shape=(5, 6)):
    """CT slices at ``z_positions``; slice k is filled with stored value 600 + 10 k, with 1800 at (row 1, col 2)."""
    os.makedirs(directory, exist_ok=True)
    uid = generate_uid()
    numbers = instance_numbers or list(range(1, len(z_positions) + 1))
    for k, (z, number) in enumerate(zip(z_positions, numbers)):
        pixels = np.full(shape, 600 + 10 * k, np.uint16)
        pixels[1, 2] = 1800
        write_dicom(
            os.path.join(directory, f"slice{k:03d}.dcm"),
            pixels,
            position=(-10.0, -20.0, z),
            instance=number,
            series_uid=uid,
            slope=slope,
            intercept=intercept,
        )
    return uid


def voxel_of(affine, world):
    """Voxel index of a world (RAS) point under a 4x4 affine."""
    ijk = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.append(np.asarray(world, dtype=float), 1.0)
    return tuple(int(round(v)) for v in ijk[:3])


def test_ct_series_in_hounsfield_units_ras_and_spacing(tmp_path):
    z = [30.0 + 2.5 * k for k in range(4)]
    # instance numbers NOT in position order: the reader must order slices by position
    write_ct_series(tmp_path / "ct", z, instance_numbers=[3, 1, 4, 2], slope=2.0, intercept=-1024.0)
    image = load_medical_image(tmp_path / "ct")
    assert image.shape == (1, 6, 5, 4)  # (C, X, Y, Z): columns, rows, slices; depth last
    assert image.dtype == torch.float32
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(image.pixdim.numpy(), [0.8, 0.7, 2.5], atol=1e-5)  # (col, row, slice) spacing in mm
    # the special pixel (row 1, col 2) of every slice, located through the affine: LPS (x, y, z) -> RAS (-x, -y, z)
    for k, zk in enumerate(z):
        lps = (-10.0 + 2 * 0.8, -20.0 + 1 * 0.7, zk)
        i, j, kk = voxel_of(image.affine, (-lps[0], -lps[1], lps[2]))
        assert float(image[0, i, j, kk]) == pytest.approx(1800 * 2.0 - 1024.0)  # HU = stored * slope + intercept
    # slice k (stored 600 + 10 k) lies at z_k: HU increases towards superior, i.e. along the last axis
    corner = image[0, 0, 0, :].numpy()
    expected = np.array([(600 + 10 * k) * 2.0 - 1024.0 for k in range(4)])
    # corner (0, 0) in RAS is the last row / column of the file; its values are the slice fill values
    np.testing.assert_allclose(corner, expected)


def test_single_ct_file_matches_pydicom_rescale():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = load_medical_image(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.shape == (1, ds.Columns, ds.Rows)  # 2D: MONAI's reader order (columns first)
    np.testing.assert_allclose(image[0].numpy(), expected.T)


def test_single_xray_dicom_without_suffix_and_monochrome1(tmp_path):
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    write_dicom(tmp_path / "xray", pixels, modality="DX", sop_class=DX_STORAGE)  # no suffix: found by preamble
    write_dicom(tmp_path / "inv.dcm", pixels, modality="CR", photometric="MONOCHROME1", sop_class=DX_STORAGE)
    assert image_format(tmp_path / "xray") == "dicom"
    image = LoadMedicalImaged(keys="image")({"image": str(tmp_path / "xray"), "modality": "XR"})
    assert image["dim"] == 2 and image["modality"] == "XR"
    np.testing.assert_allclose(image["image"][0].numpy(), pixels.T)
    inverted = load_medical_image(tmp_path / "inv.dcm")
    np.testing.assert_allclose(inverted[0].numpy(), (2**12 - 1) - pixels.T.astype(np.float32))


def test_rgb_dicom_is_2d_with_three_channels():
    path = pydicom.data.get_testdata_file("ExplVR_BigEnd.dcm")  # US, RGB, shipped with pydicom
    ds = pydicom.dcmread(path)
    image = load_medical_image(path)
    assert image.shape == (3, ds.Columns, ds.Rows)
    np.testing.assert_allclose(image.numpy(), np.transpose(ds.pixel_array, (2, 1, 0)).astype(np.float32))


def test_series_with_duplicate_gap_or_several_series_is_refused(tmp_path):
    write_ct_series(tmp_path / "dup", [0.0, 2.0, 2.0, 4.0])
    write_ct_series(tmp_path / "gap", [0.0, 2.0, 4.0, 8.0, 10.0])
    uid_a = write_ct_series(tmp_path / "two", [0.0, 2.0, 4.0])
    uid_b = generate_uid()
    for k in range(2):
        write_dicom(
            tmp_path / "two" / f"b{k}.dcm", np.zeros((5, 6), np.uint16) + k, position=(0, 0, 10.0 * k), series_uid=uid_b
        )
    with pytest.raises(ImageReadError, match="duplicate slice") as info:
        load_medical_image(tmp_path / "dup")
    assert str(info.value).startswith(str(tmp_path / "dup") + ": ")
    with pytest.raises(ImageReadError, match="missing slice"):
        load_medical_image(tmp_path / "gap")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        load_medical_image(tmp_path / "two")
    a = load_medical_image(tmp_path / "two", series_uid=uid_a)
    b = load_medical_image(tmp_path / "two", series_uid=uid_b)
    assert a.shape[-1] == 3 and b.shape[-1] == 2
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ImageReadError, match="empty"):
        load_medical_image(tmp_path / "empty")


def test_sort_dicom_slices_without_positions_uses_instance_number():
    slices = []
    for number in (3, 1, 2, 5):
        ds = Dataset()
        ds.Rows, ds.Columns, ds.InstanceNumber = 4, 4, number
        slices.append(ds)
    order, problems = sort_dicom_slices(slices)
    assert [slices[i].InstanceNumber for i in order] == [1, 2, 3, 5]
    assert len(problems) == 1 and "missing slice" in problems[0]


def test_nifti_reoriented_to_ras_with_spacing_and_2d_squeeze(tmp_path):
    data = np.random.RandomState(0).rand(4, 5, 6).astype(np.float32)
    affine = np.diag([-1.5, -2.0, 3.0, 1.0])  # L-P-S file orientation
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    image = load_medical_image(tmp_path / "v.nii.gz")
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(image.pixdim.numpy(), [1.5, 2.0, 3.0])
    np.testing.assert_allclose(image[0].numpy(), data[::-1, ::-1, :])  # x and y flipped to reach RAS
    nib.save(nib.Nifti1Image(data[:, :, :1], np.eye(4)), tmp_path / "flat.nii")
    flat = LoadMedicalImaged()({"image": str(tmp_path / "flat.nii")})
    assert flat["image"].shape == (1, 4, 5) and flat["dim"] == 2
    np.testing.assert_allclose(flat["image"][0].numpy(), data[:, :, 0])


def test_nrrd_volume(tmp_path):
    import nrrd

    data = np.random.RandomState(1).rand(4, 5, 3).astype(np.float32)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.5, 0.6, 2.0]),
        "space origin": np.zeros(3),
    }
    nrrd.write(str(tmp_path / "v.nrrd"), data, header)
    image = load_medical_image(tmp_path / "v.nrrd")
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(image.pixdim.numpy(), [0.5, 0.6, 2.0])
    np.testing.assert_allclose(image[0].numpy(), data[::-1, ::-1, :], rtol=1e-6)  # LPS -> RAS
    nrrd.write(str(tmp_path / "plain.nrrd"), data[:, :, 0], {"spacings": [0.3, 0.4]})  # no world-space fields
    plain = load_medical_image(tmp_path / "plain.nrrd")
    assert plain.shape == (1, 4, 5)


def test_png_grey_and_rgb_and_ensure_channels(tmp_path):
    grey = (np.arange(20).reshape(4, 5) * 10).astype(np.uint8)  # (H, W)
    rgb = np.random.RandomState(2).randint(0, 256, (4, 5, 3)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    loader = LoadMedicalImaged(keys="image")
    g = loader({"image": str(tmp_path / "g.png")})
    c = loader({"image": str(tmp_path / "c.png")})
    assert g["image"].shape == (1, 5, 4) and c["image"].shape == (3, 5, 4) and g["dim"] == c["dim"] == 2
    np.testing.assert_allclose(g["image"][0].numpy(), grey.T)
    np.testing.assert_allclose(c["image"].numpy(), np.transpose(rgb, (2, 1, 0)))
    to_grey = EnsureChannelsd("image", channels=1)(c)["image"]
    luminance = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert to_grey.shape == (1, 5, 4)
    np.testing.assert_allclose(to_grey[0].numpy(), luminance.T, rtol=1e-5)
    assert str(to_grey.meta["filename_or_obj"]).endswith("c.png")  # metadata kept
    to_rgb = EnsureChannelsd("image", channels=3)(g)["image"]
    assert to_rgb.shape == (3, 5, 4) and torch.equal(to_rgb[0], to_rgb[2])


def test_read_errors_name_the_file(tmp_path):
    data = np.random.RandomState(3).rand(8, 8, 8).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ok.nii.gz")
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.dcm").write_text("this is not DICOM\n")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    cases = {
        "cut.nii.gz": "EOFError",
        "text.dcm": "DICOM",
        "4d.nii.gz": "4-D image",
        "missing.nii.gz": "file not found",
        "notes.txt": "unrecognised image format",
    }
    (tmp_path / "notes.txt").write_text("x")
    for name, reason in cases.items():
        with pytest.raises(ImageReadError) as info:
            load_medical_image(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: "), str(info.value)
        assert reason in str(info.value)
    with pytest.raises(ImageReadError, match="declares dim=2"):
        LoadMedicalImaged()({"image": str(tmp_path / "ok.nii.gz"), "dim": 2})


def test_inspect_image_reads_headers_and_values(tmp_path):
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 7.0, np.float32), np.eye(4)), tmp_path / "const.nii")
    nan = np.full((4, 4, 3), np.nan, np.float32)
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    assert any("constant image" in p for p in inspect_image(tmp_path / "const.nii")["problems"])
    assert any("NaN/Inf" in p for p in inspect_image(tmp_path / "nan.nii.gz")["problems"])
    headers_only = inspect_image(tmp_path / "nan.nii.gz", values=False)
    assert headers_only["problems"] == [] and headers_only["dim"] == 3 and headers_only["shape"] == [4, 4, 3]
