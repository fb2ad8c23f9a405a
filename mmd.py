"""Moment Matching Distillation (Salimans et al., NeurIPS 2024): the mathematics as pure functions.

Specification: MATH.md (shipped in the project's design documents); section numbers below refer to it.
Every function is shape-agnostic over data dimensions (`b *dims`). A denoiser is any callable
`(z, lam, label) -> x_pred` on a batch.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def alpha_sigma(lam: Float[Array, "*s"]) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
    """`alpha = sqrt(sigmoid(lam))`, `sigma = sqrt(sigmoid(-lam))` (MATH.md §1)."""
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
