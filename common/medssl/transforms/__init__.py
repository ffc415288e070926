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
from . import views as _views
from .views import (
    MULTICROP_COUNTS,
    MULTICROP_SCALE_RANGE,
    MULTICROP_SIZES,
    MultiCropd,
    expand_crop_size,
    multicrop_views,
    seed002_augmentations,  # deprecated alias of swav_intensity_augmentations
    seed002_multicrop,  # deprecated alias of multicrop_views
    swav_intensity_augmentations,
    view_nuisance_augmentations,
)
from .labels import UNLABELLED, ClassLabeld
from .utility import PlainTensord
from .unimiss_views import ByDimensiond, unimiss_augmentations_2d, unimiss_augmentations_3d  # unimiss_views: by module path
from .batched_unimiss import BatchedUniMiSSViews, UniMiSSViewsCollate, UniMiSSWorkingSized


def __getattr__(name: str):
    if name.startswith("SEED002_"):  # deprecated constants: medssl.transforms.views warns and gives the new one
        return getattr(_views, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
