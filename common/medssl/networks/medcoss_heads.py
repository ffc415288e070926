"""MedCoSS's pretext heads, kept apart from :class:`medssl.networks.MultiModalViT` so that a later stage rebuilds
them while the encoder and tokenizers carry over.

- :class:`MAEDecoder`: MAE's decoder for one patch geometry: ``Linear(embed_dim, 512)``, a learned mask token put back
  in grid order through ``ids_restore``, learned decoder positions (class token first), 8 pre-norm blocks (512-d,
  16 heads, FFN x4), LayerNorm, ``Linear(512, patch_dim)`` (768 for 2D 16² x 3, 4096 for 3D 16³ x 1). The class
  token is dropped from the output: (B, N, patch_dim), in the order of :func:`medssl.losses.patchify`.
- :class:`MLMHead`: BERT's prediction head ``Linear(dim, dim)``-GELU-``LayerNorm(eps 1e-12)``-``Linear(dim, vocab)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medssl.networks.vit import _Block

__all__ = ["MAEDecoder", "MLMHead"]


class MAEDecoder(nn.Module):
    """See the module docstring. ``forward(tokens (B, 1 + K, embed_dim), ids_restore (B, N)) -> (B, N, patch_dim)``."""

    def __init__(
        self,
        embed_dim: int = 768,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        patch_dim: int = 768,
        num_patches: int = 196,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_patches = int(num_patches)
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, True, 1e-6, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        b, n = ids_restore.shape
        if n != self.num_patches or tokens.shape[1] > n + 1:
            raise ValueError(
                f"MAEDecoder: built for {self.num_patches} patches, got ids_restore {tuple(ids_restore.shape)} and "
                f"tokens {tuple(tokens.shape)}"
            )
        x = self.embed(tokens)
        seq = torch.cat((x[:, 1:], self.mask_token.expand(b, n + 1 - x.shape[1], -1)), dim=1)
        seq = torch.gather(seq, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat((x[:, :1], seq), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MLMHead(nn.Module):
    """BERT's masked-language-model head: token features (B, L, dim) -> logits (B, L, vocab_size)."""

    def __init__(self, dim: int = 768, vocab_size: int = 30522) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size)
        for m in (self.dense, self.decoder):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(tokens))))
