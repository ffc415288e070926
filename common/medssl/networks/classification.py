"""Classification networks for the downstream bundles: a pretrained encoder + a classification head.

:class:`EncoderClassifier` keeps the encoder as the sub-module ``encoder`` — an instance of the pretraining backbone
class itself (:class:`~medssl.networks.ResNetBackbone` of Nguyen et al. 2023 / Ghesu et al. 2022,
:class:`~medssl.networks.MiT` of UniMiSS, :class:`~medssl.networks.DenseNet3D` of Ghesu et al.,
:class:`~medssl.networks.HybridVolumeBackbone` of Nguyen et al.) — so that an exported encoder's state dict loads into
``encoder.*`` key for key (:func:`medssl.weights.load_pretrained_encoder` with ``encoder_prefix="encoder"``). The head
is ``head``:

* ``hidden_dims=()``: one linear layer ``feature_dim -> num_classes`` (Ghesu et al.'s 2D / 3D classifiers, the MiT
  encoder + FC of UniMiSS, a linear probe);
* ``hidden_dims=(252,)``: the head of Nguyen et al. 2023, FC 640 -> 252 -> classes (ReLU, dropout between).

The network returns LOGITS (B, num_classes): softmax + cross-entropy for multi-class tasks, sigmoid + BCE for
multi-label tasks; the bundles' post-processing turns them into probabilities. Inputs are channels-first:
2D (B, C, H, W), 3D (B, C, X, Y, Z) with the depth axis last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["ClassificationHead", "EncoderClassifier"]


class ClassificationHead(nn.Module):
    """MLP head ``in_dim -> hidden_dims... -> num_classes`` on (B, in_dim) features.

    Args:
        in_dim: feature size (the encoder's ``feature_dim``).
        num_classes: output logits.
        hidden_dims: sizes of the hidden layers (Linear -> ReLU -> Dropout each); empty = a single Linear.
        dropout: dropout before every Linear (0 = none).
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dims: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"ClassificationHead: in_dim={in_dim} and num_classes={num_classes} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ClassificationHead: dropout={dropout} outside [0, 1)")
        layers: list[nn.Module] = []
        width = int(in_dim)
        for hidden in hidden_dims:
            if dropout:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, int(hidden)), nn.ReLU(inplace=True)]
            width = int(hidden)
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, int(num_classes)))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.num_classes = int(in_dim), int(num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, num_classes) logits."""
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"ClassificationHead: features of shape {tuple(features.shape)}; expected (B, {self.in_dim})"
            )
        return self.layers(features)


class EncoderClassifier(nn.Module):
    """``head(encoder(x))``: a (pretrained) encoder giving (B, feature_dim) and a :class:`ClassificationHead`.

    Args:
        encoder: any module mapping a batch (B, C, H, W) or (B, C, X, Y, Z) (depth last) to (B, D) features; it
            becomes the sub-module ``encoder``.
        num_classes: number of logits.
        hidden_dims, dropout: of the head (``hidden_dims=[252]``: Nguyen et al.'s FC 640 -> 252 -> classes).
        feature_dim: D; default ``encoder.feature_dim`` (every medssl backbone has it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if feature_dim is None:
            feature_dim = getattr(encoder, "feature_dim", None)
            if feature_dim is None:
                raise ValueError(
                    f"EncoderClassifier: {type(encoder).__name__} has no feature_dim attribute; pass feature_dim"
                )
        self.encoder = encoder
        self.head = ClassificationHead(int(feature_dim), num_classes, hidden_dims, dropout)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's (B, feature_dim) features of a (B, C, H, W) / (B, C, X, Y, Z) (depth last) batch."""
        features = self.encoder(x)
        if isinstance(features, (tuple, list)):
            features = features[0]
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, C, X, Y, Z) (depth last) -> (B, num_classes) logits."""
        return self.head(self.forward_features(x))
