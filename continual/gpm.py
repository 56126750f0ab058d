"""Gradient Projection Memory (Saha et al., 2021): orthonormal bases of the input subspaces old tasks use.

``gpm_update`` follows the reference code: for the first task keep the top singular directions of the activation
matrix until their energy reaches ``threshold``; for later tasks project the new activations off the existing
basis and add residual directions until the total (old-captured + added) energy fraction reaches ``threshold``.
The threshold schedule is GPM's: ``0.97 + 0.003 * task_index``.
"""

from __future__ import annotations

import torch


def gpm_threshold(task_index: int, base: float = 0.97, step: float = 0.003) -> float:
    return min(base + step * task_index, 0.9999)


def gpm_update(basis: torch.Tensor | None, acts: torch.Tensor, threshold: float) -> torch.Tensor:
    """Grow ``basis`` (d, k) with directions of ``acts`` (n, d rows of activations); returns (d, k') float32."""
    X = acts.detach().float()  # (n, d)
    return gpm_update_cov(basis, X.t() @ X, threshold)


def gpm_update_cov(basis: torch.Tensor | None, cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """``gpm_update`` from the uncentred second moment ``cov = Xᵀ X`` (d, d) instead of the rows themselves.

    SVD of the activation matrix X (n, d) gives the eigenvectors of Xᵀ X with eigenvalues S², so both agree.
    """
    C = cov.detach().double()
    d = C.shape[0]
    total = torch.trace(C)
    if total <= 0:
        return basis.float() if basis is not None else torch.zeros(d, 0, device=C.device)
    if basis is None or basis.shape[1] == 0:
        S2, U = _eig_desc(C)
        ratio = torch.cumsum(S2, 0) / total
        k = int((ratio < threshold).sum().item()) + 1
        return U[:, : min(k, d)].float().contiguous()
    Ub = basis.to(C.device).double()
    P = torch.eye(d, dtype=C.dtype, device=C.device) - Ub @ Ub.t()
    C_hat = P @ C @ P  # second moment of the residual activations
    S2, U = _eig_desc(C_hat)
    accumulated = float((total - torch.trace(C_hat)) / total)
    ratio = [float(v) for v in S2 / total if v > 1e-10 * total]  # never re-add directions already in the basis
    k = 0
    for r in ratio:
        if accumulated >= threshold:
            break
        accumulated += r
        k += 1
    if k == 0:
        return basis
    out = torch.cat([Ub, U[:, :k]], 1)
    return out[:, :d].float().contiguous()


def _eig_desc(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    S2, U = torch.linalg.eigh((C + C.t()) / 2)
    return S2.flip(0).clamp_min(0), U.flip(1)


# (parameter, its value at the task's start or None, basis (d, k)): see ``keep_changes_off``
Projected = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


def project_off(grad: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Remove from ``grad`` (out, d) its component in the input subspace ``basis`` (d, k): g - g U Uᵀ."""
    if basis is None or basis.shape[1] == 0:
        return grad
    U = basis.to(grad.device, grad.dtype)
    return grad - (grad @ U) @ U.t()


@torch.no_grad()
def keep_changes_off(projected: list[Projected]) -> None:
    """For each ``(w, start, basis)``: ``w <- start + (w - start)`` with the change projected off ``basis``, so
    what ``w`` does on that subspace stays as at ``start``; ``start`` None keeps ``w`` itself off ``basis``. A 1-D
    ``w`` is one row."""
    for w, start, basis in projected:
        change = w if start is None else w - start
        kept = project_off(change.reshape(-1, change.shape[-1]), basis).view_as(w)
        w.copy_(kept if start is None else start + kept)
