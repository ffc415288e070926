"""medssl.transforms: MONAI-style dictionary transforms (energy bands, ...)."""

from .energy import (
    DEFAULT_SIGMAS,
    EnergyBandAugmentd,
    band_energies,
    energy_bands,
    estimate_reference_energies,
    image_spacing_for_sigmas,
    load_energy_reference,
    recombine_bands,
)
