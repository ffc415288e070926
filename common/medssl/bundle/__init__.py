"""medssl.bundle: the contract every bundle of this project follows, and its checker."""

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
