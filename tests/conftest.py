"""Test-wide JAX settings: strict promotion rules and 8 fake CPU devices.

jaxtyping's import hook (with beartype) over the project's modules is enabled from
`pyproject.toml` (`--jaxtyping-packages`), so every shape annotation is checked at runtime.
"""

import os

# Must precede the first JAX operation: XLA reads the flag when the CPU backend starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
