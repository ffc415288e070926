"""Sinkhorn-Knopp equal-partition codes (SwAV, Caron et al. 2020, Sec. 3.1; Ghesu et al. 2022 Eq. 4; Nguyen et al.
2023)."""

from __future__ import annotations

import torch

from medssl.utils.dist import all_reduce_max, all_reduce_sum

__all__ = ["sinkhorn_knopp"]


def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Soft codes Q for a batch of prototype scores, with every prototype used equally over the GLOBAL batch.

    With z the L2-normalised embeddings and C the L2-normalised prototype rows, ``scores = z · Cᵀ`` (B_local, K).
    In the paper's (K × B) layout: Q = exp(scores / ε)ᵀ; Q /= ΣQ (summed over all ranks); then ``n_iters`` times:
    rows (prototypes) Q /= row sums over the global batch (all-reduced), Q /= K; columns (samples) Q /= local
    column sums, Q /= B; finally Q *= B. B is the global number of rows (the sum of every rank's B_local, i.e.
    B_local × world_size when ranks hold equal shares). Returns Qᵀ (B_local, K): every row (a sample's code) sums
    to 1 and, over the global batch, every prototype receives B / K of the mass (up to the last row step).

    Under an initialised ``torch.distributed`` process group the result on each rank equals the matching slice
    of what one process computes on the concatenated batch (ranks concatenated in rank order). Every rank must
    call this function the same number of times in the same order (it runs 3 + ``n_iters`` all-reduces); a rank
    may hold zero rows.

    Numerics: runs under ``no_grad`` with autocast disabled, in float32 (half / bfloat16 / float32 input) or float64
    (float64 input); exp(1/0.03) ≈ 3e14 overflows float16. Before the exponential the GLOBAL maximum score
    (all-reduced) is subtracted: a constant factor common to all ranks cancels in the first global normalisation,
    so the codes are those of the formula above, and nothing overflows for any score range. For scores in
    [-1, 1] (normalised z and C) no prototype row can underflow to zero in float32 for ε ≥ 0.03.

    Args:
        scores: (B_local, K) prototype scores of this rank's samples (any float dtype; not modified).
        epsilon: entropic regularisation ε (0.05 in SwAV, 0.03 in Ghesu et al. Table I).
        n_iters: number of Sinkhorn iterations (3).

    Returns:
        codes (B_local, K), float32 (float64 for float64 input), no grad.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn_knopp: scores must be (B, K), got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn_knopp: epsilon must be > 0, got {epsilon}")
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.detach().to(compute_dtype)
        n_local, n_prototypes = scores.shape

        # global max (a constant shift for every rank, harmless after the global normalisation below)
        local_max = scores.max() if n_local > 0 else scores.new_tensor(float("-inf"))
        global_max = all_reduce_max(local_max.reshape(1).clone())
        # the all-reduced value is the same on every rank, so every rank takes the same branch
        if bool(global_max.eq(float("-inf")).all()):
            return scores.new_zeros((n_local, n_prototypes))  # empty batch on every rank
        if not bool(torch.isfinite(global_max).all()):
            raise ValueError(f"sinkhorn_knopp: scores contain non-finite values (global max {global_max.item()})")
        codes = torch.exp((scores - global_max) / epsilon)  # (B_local, K) = Qᵀ

        # one collective for the total mass and the global batch size B
        total_and_count = torch.stack([codes.sum(), codes.new_tensor(float(n_local))])
        all_reduce_sum(total_and_count)
        total, global_batch = total_and_count[0], total_and_count[1]
        codes /= total

        for _ in range(n_iters):
            # rows of Q (prototypes): global sums
            prototype_sums = all_reduce_sum(codes.sum(dim=0, keepdim=True))
            codes /= prototype_sums
            codes /= n_prototypes
            # columns of Q (samples): local sums
            codes /= codes.sum(dim=1, keepdim=True)
            codes /= global_batch

        codes *= global_batch
    return codes
