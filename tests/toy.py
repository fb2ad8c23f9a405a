"""Small independent references for the tests: a 2-D Gaussian mixture with its exact denoiser and
the energy distance (brute force). `MLPDenoiser`, the toy model, lives in uvit.py."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class Mixture(eqx.Module):
    """Isotropic Gaussian mixture `sum_k pi_k N(m_k, std^2 I)` with its exact denoiser `E[x |
    z]`."""

    means: jax.Array
    weights: jax.Array
    std: float

    def __call__(self, z, lam, label):
        """Closed form: `p(z|k) = N(alpha m_k, (alpha^2 std^2 + sigma^2) I)`, `E[x|z,k] = m_k +
        alpha std^2 (z - alpha m_k) / var`."""
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


def energy_distance(a, b) -> float:
    """Energy distance `2 E|a-b| - E|a-a'| - E|b-b'|` (V-statistic), in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)

    def mean_dist(x, y):
        return np.mean(np.sqrt(np.sum((x[:, None] - y[None]) ** 2, -1)))

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)
