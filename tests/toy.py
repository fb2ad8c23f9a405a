"""Small independent references for the tests: a 2-D Gaussian mixture with its exact denoiser, a tiny
MLP denoiser, and the energy distance."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class Mixture(eqx.Module):
    """Isotropic Gaussian mixture `sum_k pi_k N(m_k, std^2 I)` with its exact denoiser `E[x | z]`."""

    means: jax.Array
    weights: jax.Array
    std: float

    def __call__(self, z, lam, label):
        """Closed form: `p(z|k) = N(alpha m_k, (alpha^2 std^2 + sigma^2) I)`, `E[x|z,k] = m_k + alpha std^2 (z - alpha m_k) / var`."""
        alpha = jnp.sqrt(jax.nn.sigmoid(lam))[:, None, None]
        sigma2 = jax.nn.sigmoid(-lam)[:, None, None]
        var = alpha**2 * self.std**2 + sigma2
        diff = z[:, None, :] - alpha * self.means[None]  # (b, K, d)
        logits = jnp.log(self.weights)[None] - jnp.sum(diff**2, -1) / (2 * var[..., 0])
        resp = jax.nn.softmax(logits, axis=1)[..., None]
        cond_mean = self.means[None] + alpha * self.std**2 * diff / var
        return jnp.sum(resp * cond_mean, axis=1)

    def draw(self, key, n):
        kc, kn = jax.random.split(key)
        comp = jax.random.choice(kc, self.means.shape[0], (n,), p=self.weights)
        return self.means[comp] + self.std * jax.random.normal(kn, (n, self.means.shape[1]))

    def moments(self):
        """Exact mean and covariance of the mixture."""
        m = np.asarray(self.means, np.float64)
        w = np.asarray(self.weights, np.float64)
        mean = w @ m
        centred = m - mean
        cov = (centred.T * w) @ centred + self.std**2 * np.eye(m.shape[1])
        return mean, cov


def ring(num: int = 8, radius: float = 0.7, std: float = 0.05) -> Mixture:
    angles = np.arange(num) * 2 * np.pi / num
    means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return Mixture(jnp.asarray(means, jnp.float32), jnp.full((num,), 1.0 / num, jnp.float32), std)


class MLPDenoiser(eqx.Module):
    """`x_hat = alpha z - sigma v(z, lam, label)` with an MLP v-network: a toy denoiser for points."""

    mlp: eqx.nn.MLP
    embed: eqx.nn.Embedding

    def __init__(self, *, dim: int, width: int, depth: int, num_classes: int, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(num_classes + 1, 8, key=k1)
        self.mlp = eqx.nn.MLP(dim + 8 + 8, dim, width, depth, activation=jax.nn.silu, key=k2)

    def __call__(self, z, lam, label):
        freqs = jnp.asarray([0.05, 0.1, 0.2, 0.4], jnp.float32)
        f = lam[:, None] * freqs[None]
        feats = jnp.concatenate([z, jnp.sin(f), jnp.cos(f), jax.vmap(self.embed)(label)], axis=1)
        v = jax.vmap(self.mlp)(feats)
        alpha = jnp.sqrt(jax.nn.sigmoid(lam))[:, None]
        sigma = jnp.sqrt(jax.nn.sigmoid(-lam))[:, None]
        return alpha * z - sigma * v


def energy_distance(a, b) -> float:
    """Energy distance `2 E|a-b| - E|a-a'| - E|b-b'|` (V-statistic), in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)

    def mean_dist(x, y):
        return np.mean(np.sqrt(np.sum((x[:, None] - y[None]) ** 2, -1)))

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)
