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
from .intensity import RandGammad, RandLinearIntensityd, RandRescaleFractiond
from .views import (
    SEED002_CROP_COUNTS,
    SEED002_CROP_SIZES,
    SEED002_SCALE_RANGE,
    MultiCropd,
    expand_crop_size,
    seed002_augmentations,
    seed002_multicrop,
    view_nuisance_augmentations,
)
from .labels import UNLABELLED, ClassLabeld
from .utility import PlainTensord
from .unimiss_views import ByDimensiond, unimiss_augmentations_2d, unimiss_augmentations_3d  # unimiss_views: by module path
