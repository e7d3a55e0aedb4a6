"""Closed forms that constrain an update to some directions of key space.

* :func:`rank_one_update` -- ROME's rank-one insertion (Meng et al. 2022a, eq. 2).
* :func:`nullspace_projector` -- P = Û Ûᵀ onto the eigenvectors of C = E[kkᵀ] whose
  eigenvalues are below a threshold: the directions preserved keys (almost) never take
  (AlphaEdit, Fang et al. 2025).
* :func:`solve_projected` -- AlphaEdit's update Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹
  (AlphaEdit's closed form), which annihilates every key outside the null space.

Orientation throughout: Δ ``[d_out, d_in]`` like ``nn.Linear.weight``; keys are columns.
"""

from __future__ import annotations

import torch


def rank_one_update(resid: torch.Tensor, key: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Δ = r (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k) in float64 (ROME eq. 2, with r = v* − W k).

    ``resid`` r ``[d_out]``, ``key`` k ``[d_in]``, ``cov`` C ``[d_in, d_in]``. The result
    maps k exactly onto r (Δ k = r) while changing W least in the C-weighted sense: for
    any other key x, Δ x = r · (C⁻¹k)ᵀx / (C⁻¹k)ᵀk.
    """
    k = key.double()
    u = torch.linalg.solve(cov.double(), k)  # [d_in] C⁻¹k
    return torch.outer(resid.double(), u) / (u @ k)  # [d_out, d_in], rank one


def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ, Û the eigenvectors of ``cov`` with eigenvalue < ``threshold`` (float64).

    ``cov`` is the (symmetric, PSD) second moment E[kkᵀ] ``[d_in, d_in]``. P is the
    orthogonal projector onto the (approximate) null space of the preserved keys: P k ≈ 0
    for keys of ordinary text. AlphaEdit's reference takes the SVD; for a symmetric PSD
    matrix the singular vectors and values are the eigenvectors and eigenvalues.
    """
    c = cov.double()
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)  # ascending eigenvalues
    u = evecs[:, evals < threshold]  # [d_in, n_null]
    return u @ u.T


def solve_projected(
    resid: torch.Tensor,
    keys: torch.Tensor,
    proj: torch.Tensor,
    prev_kk: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹ in float64 (AlphaEdit's closed form).

    ``resid`` R ``[d_out, n]``, ``keys`` K ``[d_in, n]``, ``proj`` P ``[d_in, d_in]``,
    ``prev_kk`` K_p K_pᵀ ``[d_in, d_in]`` (keys of earlier edits; None = none yet),
    ``l2`` α. With A = (K_p K_pᵀ + K Kᵀ) P + α I, Δ = (R Kᵀ P) A⁻¹, solved as
    Aᵀ X = P K Rᵀ, Δ = Xᵀ. For x with P x = 0, A x = α x, so Δ x = R Kᵀ P x / α = 0:
    the update leaves every direction outside the null space untouched.
    """
    K = keys.double()
    P = proj.double()
    M = K @ K.T  # [d_in, d_in]
    if prev_kk is not None:
        M = M + prev_kk.double()
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    A_t = P @ M + l2 * eye  # Aᵀ, since P and M are symmetric
    X = torch.linalg.solve(A_t, P @ K @ resid.double().T)  # [d_in, d_out]
    return X.T
