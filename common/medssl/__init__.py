"""medssl: self-supervised pretraining on mixed 2D and 3D medical images, as MONAI bundles."""

__version__ = "0.1.0"
