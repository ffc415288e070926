"""medssl.data: datalists, readers, modality presets, slices of volumes, samplers, the demo dataset.

Exports are resolved lazily (PEP 562) so that light users (``tools/datalist.py``) do not pay MONAI's import time.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # datalist format and checks (no MONAI import)
    "MODALITIES": "datalist",
    "MODALITY_ALIASES": "datalist",
    "normalize_modality": "datalist",
    "load_datalist": "datalist",
    "save_datalist": "datalist",
    "build_datalist": "datalist",
    "check_datalist": "datalist",
    "inspect_image": "datalist",
    "ImageReadError": "datalist",
    # readers (MONAI LoadImage readers)
    "LoadMedicalImaged": "readers",
    "load_medical_image": "readers",
    "EnsureChannels": "readers",
    "EnsureChannelsd": "readers",
    # modality intensity presets
    "CTWindowd": "presets",
    "PercentileScaled": "presets",
    "UnitRangeRGBd": "presets",
    "ModalityIntensityd": "presets",
    "MODALITY_PRESETS": "presets",
    # bad input during training
    "SafeDataset": "robust",
    "BadItemError": "robust",
    # seeded, resumable, distributed-aware sampling
    "SampleKey": "samplers",
    "item_seed": "samplers",
    "item_seeds": "samplers",
    "SeededDataset": "samplers",
    "DistributedBatchSampler": "samplers",
    "VolumeGroupedBatchSampler": "samplers",
    "ModalityBatchSampler": "samplers",
    "DimensionAlternatingBatchSampler": "samplers",
    # 2D slices of 3D volumes
    "VolumeSliceDataset": "slices",
    "make_slice_batch_sampler": "slices",
    # the pipeline bundles wire
    "load_items": "pipeline",
    "loading_transforms": "pipeline",
    "make_dataset": "pipeline",
    # the embedded demo dataset
    "build_demo_dataset": "demo",
    "DEMO_CLASSES": ("demo", "CLASSES"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'medssl.data' has no attribute {name!r}")
    module, attr = (target, name) if isinstance(target, str) else target
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
