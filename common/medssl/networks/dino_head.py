"""The DINO projection head used by every self-distillation method (UniMiSS, Xie et al. ECCV 2022; DINO, Caron et al.
2021).

g(x) = W_last · normalize(MLP(x)): an MLP (Linear → GELU → … → Linear to a bottleneck, no BatchNorm by default),
L2 normalisation, then a bias-free weight-normalised Linear to K outputs (the "prototype" logits that
:class:`medssl.losses.DINOLoss` turns into distributions). The last layer is W = g · v / ‖v‖ (row-wise, i.e.
``torch.nn.utils.weight_norm(dim=0)``) with the gain g fixed at 1 (``norm_last_layer=True``, the reference's
default), so every output logit is a cosine similarity in [−1, 1] before the temperature.

State-dict keys equal the reference's (``mlp.0.weight`` … ``mlp.4.bias``, ``last_layer.weight_g`` (K, 1),
``last_layer.weight_v`` (K, bottleneck)), so published teacher / student heads load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free Linear with a weight-normalised matrix W = g · v / ‖v‖₂ (norm of each output row of v).

    Args:
        in_features: input size (the bottleneck, 256).
        out_features: K (65536 in UniMiSS / DINO).
        fix_gain: g fixed at 1 (``requires_grad=False``): W has unit-norm rows whatever v is.

    Parameters ``weight_v`` (out, in), initialised as ``nn.Linear``'s weight, and ``weight_g`` (out, 1), set to 1
    (the names and shapes of ``torch.nn.utils.weight_norm``, without its deprecated hooks). ``weight`` is the
    effective matrix W. Input (..., in_features), output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, fix_gain: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"WeightNormLinear: in_features={in_features}, out_features={out_features} must be >= 1")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_gain)
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())

    @property
    def fix_gain(self) -> bool:
        return not self.weight_g.requires_grad

    @property
    def weight(self) -> torch.Tensor:
        """W = g · v / ‖v‖ (row-wise)."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fix_gain={self.fix_gain}"


class DINOHead(nn.Module):
    """DINO head: MLP → L2 normalise → weight-normalised Linear (UniMiSS: 48 → 2048 → 2048 → 256 → 65536).

    Args:
        in_dim: backbone feature size (48: MiT's decoder SSL token).
        out_dim: K, the number of output logits (65536).
        hidden_dim: width of the hidden layers (2048).
        bottleneck_dim: size of the normalised embedding (256).
        n_layers: number of Linear layers of the MLP (3; 1 = a single Linear(in_dim, bottleneck_dim)).
        use_bn: BatchNorm1d after each hidden Linear (False in UniMiSS / DINO ViT).
        norm_last_layer: fix the last layer's weight-norm gain at 1 (True, the reference). False lets g train.

    Input (..., in_dim) — e.g. (N, in_dim), or (N, m, in_dim) for the m slices of a volume; output (..., out_dim).
    The hidden Linears are initialised with a truncated normal (std 0.02) and zero biases; the last layer keeps
    ``nn.Linear``'s initialisation for v. With the defaults and in_dim=48: 21,664,000 parameters, 21,598,464 of them
    trainable (the 65,536 gains are fixed).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead: n_layers={n_layers} must be >= 1")
        if min(in_dim, out_dim, bottleneck_dim) < 1 or (n_layers > 1 and hidden_dim < 1):
            raise ValueError(
                f"DINOHead: sizes must be >= 1 (in_dim={in_dim}, hidden_dim={hidden_dim}, "
                f"bottleneck_dim={bottleneck_dim}, out_dim={out_dim})"
            )
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        if n_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for i in range(n_layers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                last = i == n_layers - 2
                layers.append(nn.Linear(hidden_dim, bottleneck_dim if last else hidden_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding normalize(MLP(x)) (..., bottleneck_dim)."""
        if features.dim() < 2 or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"DINOHead expects features (..., {self.in_dim}) with a batch dimension, got shape "
                f"{tuple(features.shape)}"
            )
        x = self.mlp(features) if features.dim() == 2 else self.mlp(features.flatten(0, -2)).unflatten(
            0, features.shape[:-1]
        )
        return F.normalize(x, dim=-1, p=2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(features))
