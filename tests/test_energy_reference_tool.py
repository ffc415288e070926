"""tools/energy_reference.py: per-modality reference energies from a datalist, loadable by EnergyBandAugmentd."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, TOOLS, load_tool, run_cmd
from PIL import Image

from medssl.data.datalist import load_datalist
from medssl.data.presets import ModalityIntensityd
from medssl.data.readers import LoadMedicalImaged
from medssl.transforms.energy import EnergyBandAugmentd, band_energies, energy_bands, image_spacing_for_sigmas


@pytest.fixture(scope="module")
def tool():
    return load_tool("energy_reference.py", "energy_reference_tool")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    """3 CT volumes (NIfTI, HU, anisotropic spacing), 4 radiographs (PNG) and one corrupt PNG."""
    root = tmp_path_factory.mktemp("energy_data")
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        volume = rng.normal(0, 300 + 100 * i, size=(20, 18, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), root / f"ct{i}.nii.gz")
        items.append({"image": f"ct{i}.nii.gz", "modality": "CT", "dim": 3})
    for i in range(4):
        y, x = np.mgrid[0:32, 0:40]
        picture = 120 + 60 * np.sin(x / (2 + i)) + rng.normal(0, 10 * (i + 1), size=x.shape)
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(root / f"xr{i}.png")
        items.append({"image": f"xr{i}.png", "modality": "DX", "dim": 2})  # alias -> XR
    (root / "broken.png").write_bytes(b"not a png at all")
    items.append({"image": "broken.png", "modality": "XR", "dim": 2})
    path = root / "datalist.json"
    path.write_text(json.dumps({"name": "energy", "training": items}))
    return path


def direct_energies(items):
    """Band energies of each item computed without the tool (same loading, same decomposition defaults)."""
    load, scale = LoadMedicalImaged(keys="image"), ModalityIntensityd(keys="image")
    rows = []
    for item in items:
        d = scale(load({"image": item["image"], "modality": item["modality"], "dim": item["dim"]}))
        spacing = image_spacing_for_sigmas(d["image"], "relative")
        rows.append(band_energies(energy_bands(d["image"], spacing=spacing)).numpy())
    return np.stack(rows)


def test_tool_statistics_subset_skip_and_transform_loads_it(tool, datalist, tmp_path, capsys):
    out = tmp_path / "ref.json"
    written = tool.estimate(str(datalist), out=str(out), max_items_per_modality=2, seed=3, progress_every=1)
    printed = capsys.readouterr().out
    reference = json.loads(out.read_text())
    assert reference == json.loads(json.dumps(written))
    assert set(reference["modalities"]) == {"CT", "XR"}
    assert reference["bands"] == ["L16", "B16", "B8", "B4", "B2", "B1"] and reference["sigma_unit"] == "relative"
    # the statistics are those of the seeded subset the tool selected (the broken PNG may be in it: then skipped)
    items = load_datalist(datalist)
    selected = tool.select_items(items, 2, 3)
    for modality in ("CT", "XR"):
        good = [item for item in selected[modality] if not item["image"].endswith("broken.png")]
        # up to R = 2 items per modality; a drawn unreadable item is skipped, not replaced
        assert len(selected[modality]) == 2 and reference["modalities"][modality]["n"] == len(good)
        table = direct_energies(good)
        np.testing.assert_allclose(reference["modalities"][modality]["mean"], table.mean(0), rtol=1e-5)
        np.testing.assert_allclose(reference["modalities"][modality]["std"], table.std(0), rtol=1e-4, atol=1e-9)
    assert "CT" in printed and "XR" in printed and "wrote" in printed
    # the transform reads the file and uses the modality's statistics (r = 0: normalised to the mean)
    transform = EnergyBandAugmentd(reference=str(out), sample_range_sigma=0.0)
    image = torch.rand(1, 24, 24)
    energies = band_energies(energy_bands(image)).numpy()
    factors = transform.scale_factors(energies, "XR")
    np.testing.assert_allclose(factors * energies, reference["modalities"]["XR"]["mean"], rtol=1e-6)


def test_tool_counts_skips_and_seeded_subsets(tool, datalist, tmp_path):
    everything = tool.estimate(str(datalist), out=str(tmp_path / "all.json"), max_items_per_modality=1000)
    assert everything["modalities"]["CT"]["n"] == 3 and everything["modalities"]["XR"]["n"] == 4
    assert len(everything["skipped"]) == 1 and "broken.png" in everything["skipped"][0]
    items = load_datalist(datalist)
    subsets = {seed: tool.select_items(items, 2, seed) for seed in range(6)}
    assert all(len(s["CT"]) == 2 and len(s["XR"]) == 2 for s in subsets.values())
    assert subsets[0] == tool.select_items(items, 2, 0)  # seeded
    assert len({tuple(i["image"] for i in s["XR"]) for s in subsets.values()}) > 1  # but not fixed
    with pytest.raises(Exception, match="broken.png"):
        tool.estimate(str(datalist), out=str(tmp_path / "strict.json"), skip_bad=False)


def test_cli_writes_next_to_the_datalist_by_default(datalist):
    proc = run_cmd(
        [PYTHON, str(TOOLS / "energy_reference.py"), "--datalist", str(datalist), "--max-items-per-modality", "1"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = datalist.parent / "energy_reference.json"
    reference = json.loads(written.read_text())
    assert all(stats["n"] <= 1 for stats in reference["modalities"].values())
    assert "wrote" in proc.stdout and "{" not in proc.stdout.splitlines()[-1]  # a summary, not the dict dump
    EnergyBandAugmentd(reference=str(written))
