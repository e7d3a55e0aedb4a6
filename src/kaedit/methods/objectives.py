"""Closed-form weight updates for the AdaPLE objectives (paper eq. 2, 3, 4; appendix C).

Notation (paper §2.4, §4.1), one edited matrix W = W_out^l ``[d_out, d_in]``:

* K = K₁ ``[d_in, n]``: keys of the n edited facts; K₀ the keys of everything the layer
  already stores, summarised by K₀K₀ᵀ = λC with C = E[kkᵀ] ``[d_in, d_in]``.
* W₀ the current weight, assumed to be the least-squares memory of (K₀, V₀), i.e. it
  satisfies the normal equation W₀K₀K₀ᵀ = V₀K₀ᵀ (eq. 7; the assumption MEMIT makes too).
* V₁ ``[d_out, n]`` the old values to forget, V₁ = W₀K (eq. 22); V₂ ``[d_out, n]`` the
  new values to write. Δ = W − W₀ is returned in ``nn.Linear.weight`` orientation.

Derivations (all objectives are quadratic in W; set the gradient to zero, subtract the
normal equation W₀K₀K₀ᵀ = V₀K₀ᵀ):

* **MEMIT, eq. 1/2** -- J = ‖WK₀ − V₀‖² + ‖WK − V₂‖².
  ½∇J = WK₀K₀ᵀ − V₀K₀ᵀ + WKKᵀ − V₂Kᵀ = 0  ⇒  Δ(λC + KKᵀ) = (V₂ − W₀K)Kᵀ.

* **Eq. 3 exactly as printed** -- J = ‖WK₀ − V₀‖² + ‖WK − V₂‖² − ‖WK − V₁‖².
  The two K terms share the quadratic part tr(WKKᵀWᵀ), which cancels:
  ‖WK − V₂‖² − ‖WK − V₁‖² = −2 tr(W K (V₂ − V₁)ᵀ) + ‖V₂‖² − ‖V₁‖²  (linear in W).
  ½∇J = WK₀K₀ᵀ − V₀K₀ᵀ − (V₂ − V₁)Kᵀ = 0  ⇒  **Δ = (V₂ − V₁) Kᵀ (λC)⁻¹**.
  The Hessian is λC ⊗ I (positive definite), so this is the unique minimiser. With
  V₁ = W₀K it is Δ = (V₂ − W₀K)Kᵀ(λC)⁻¹: MEMIT without the KKᵀ term, so the change at
  a key is scaled by kᵀ(λC)⁻¹k instead of the saturating kᵀ(λC)⁻¹k / (1 + kᵀ(λC)⁻¹k),
  and it can overshoot when λ is small. This confirms the claim in
  ``shared/notes/smollm2-editing.md``.

* **Eq. 4 as printed** -- Δ = R Kᵀ (λC + 2KKᵀ)⁻¹, R = V₂ − 3W₀K. It does not follow
  from eq. 3: the block form (eq. 17) puts +K₁K₁ᵀ for the erased term instead of −K₁K₁ᵀ
  (the sign of −V₁ is kept on the right-hand side only), and eq. 20 swaps the
  coefficients of V₁ and W₀K. Eq. 4 is instead the exact minimiser of
  ‖WK₀ − V₀‖² + 2‖WK − ½(V₂ − W₀K)‖²:
  ½∇ = WK₀K₀ᵀ − V₀K₀ᵀ + 2WKKᵀ − (V₂ − W₀K)Kᵀ = 0  ⇒  Δ(λC + 2KKᵀ) = (V₂ − 3W₀K)Kᵀ.
  So it pulls the layer's output on the edited keys towards *half the residual*
  ½(V₂ − W₀K) — erasing W₀K rather than moving it to V₂ — and moves the weights even for
  an edit that changes nothing (V₂ = W₀K gives R = −2W₀K ≠ 0).

* **Consistent erase term** -- J = ‖WK₀ − V₀‖² + ‖WK − V₂‖² − α‖WK − V₁‖², α ≤ 1.
  ½∇J = WK₀K₀ᵀ − V₀K₀ᵀ + (1 − α)WKKᵀ − (V₂ − αV₁)Kᵀ = 0
  ⇒  **Δ = (V₂ − αV₁ − (1 − α)W₀K) Kᵀ (λC + (1 − α)KKᵀ)⁻¹**  (Hessian (λC + (1−α)KKᵀ) ⊗ I
  is positive definite for α ≤ 1). α = 0 is MEMIT, α = 1 is eq. 3. With V₁ = W₀K the
  residual is V₂ − W₀K for every α: α only weakens the KKᵀ damping. α = −1 gives
  Δ = (V₂ − W₀K)Kᵀ(λC + 2KKᵀ)⁻¹, which is the update line of the paper's Algorithm 1
  (residual r, not V₂ − 3W₀K, with C + 2KKᵀ).

All solves run in float64 through :func:`kaedit.methods.solve.solve_update`.
"""

from __future__ import annotations

import math

import torch

from kaedit.methods.solve import solve_update


def memit_update(
    v2: torch.Tensor, w0k: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """Δ = (V₂ − W₀K) Kᵀ (λC + KKᵀ)⁻¹ (paper eq. 2; Table 3 "w/o new optim").

    ``v2``, ``w0k`` ``[d_out, n]``, ``keys`` ``[d_in, n]``, ``cov`` ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` float32.
    """
    return erase_update(v2, w0k, w0k, keys, cov, lam, alpha=0.0)


def algorithm1_update(
    v2: torch.Tensor, w0k: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """Δ = (V₂ − W₀K) Kᵀ (λC + 2KKᵀ)⁻¹: the update line of the paper's Algorithm 1
    (Δˡ = Rˡ Kˡᵀ(Cˡ + 2KˡKˡᵀ)⁻¹ with Rˡ the spread residual), = :func:`erase_update` at α = −1.

    ``v2``, ``w0k`` ``[d_out, n]``, ``keys`` ``[d_in, n]``, ``cov`` ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` float32.
    """
    return erase_update(v2, w0k, w0k, keys, cov, lam, alpha=-1.0)


def exact_update(
    v2: torch.Tensor,
    v1: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """Δ = (V₂ − V₁) Kᵀ (λC)⁻¹: the minimiser of paper eq. 3 as written (see module doc).

    ``v2``, ``v1`` ``[d_out, n]``, ``keys`` ``[d_in, n]``, ``cov`` ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` float32. W₀K drops out (its coefficient is 1 − α = 0).
    """
    resid = v2.double() - v1.double()  # [d_out, n]
    return solve_update(resid, keys, cov, lam, kk_coef=0.0)


def paper_update(
    v2: torch.Tensor, w0k: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """Δ = R Kᵀ (λC + 2KKᵀ)⁻¹ with R = V₂ − 3W₀K: paper eq. 4 / eq. 24 exactly as printed.

    ``v2``, ``w0k`` ``[d_out, n]``, ``keys`` ``[d_in, n]``, ``cov`` ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` float32. Note (module doc): this is the minimiser of
    ‖WK₀ − V₀‖² + 2‖WK − ½(V₂ − W₀K)‖², not of eq. 3.
    """
    resid = v2.double() - 3.0 * w0k.double()  # [d_out, n] R_AdaPLE
    return solve_update(resid, keys, cov, lam, kk_coef=2.0)


def erase_update(
    v2: torch.Tensor,
    v1: torch.Tensor,
    w0k: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    alpha: float,
) -> torch.Tensor:
    """Δ = (V₂ − αV₁ − (1−α)W₀K) Kᵀ (λC + (1−α)KKᵀ)⁻¹: minimiser of eq. 3 with the erase
    term weighted by α (α = 0: MEMIT eq. 2; α = 1: eq. 3; α = −1: Algorithm 1's update).

    ``v2``, ``v1``, ``w0k`` ``[d_out, n]``, ``keys`` ``[d_in, n]``, ``cov``
    ``[d_in, d_in]``; returns Δ ``[d_out, d_in]`` float32. Needs α ≤ 1 (convexity).
    """
    check_alpha(alpha)
    resid = v2.double() - alpha * v1.double() - (1.0 - alpha) * w0k.double()  # [d_out, n]
    return solve_update(resid, keys, cov, lam, kk_coef=1.0 - alpha)


def check_alpha(alpha: float) -> None:
    """Raise ValueError unless the erase objective has a unique minimiser (finite α ≤ 1)."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha <= 1.0):
        raise ValueError(
            f"erase coefficient alpha={alpha!r} must be a finite number <= 1: above 1 the "
            "K terms ‖WK−V₂‖² − α‖WK−V₁‖² are concave in W and a minimiser need not exist"
        )
