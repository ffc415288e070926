"""medssl.bundle: the contract every bundle of this project follows, its checker, and command-line value coercion."""

from .contract import (
    META_SCHEMA_PATH,
    OFFICIAL_SCHEMA_URL,
    REQUIRED_FILES,
    TRAIN_TOP_LEVEL_KEYS,
    BundleReport,
    find_bundles,
    verify_bundle,
    verify_metadata,
)
from .params import FALSE_WORDS, TRUE_WORDS, as_bool, require
