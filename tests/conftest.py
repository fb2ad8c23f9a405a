"""Test-wide JAX settings: the CPU platform, strict promotion rules and 8 fake CPU devices.

jaxtyping's import hook (with beartype) over the project's modules is enabled from
`pyproject.toml` (`--jaxtyping-packages`), so every shape annotation is checked at runtime.
"""

import os

# Both must precede the first JAX import. The CPU platform is forced: the 8 fake devices exist only
# there, and exact comparisons (a resumed run, one device against eight) assume its arithmetic; on
# a machine with an accelerator JAX would otherwise pick that and the suite would test another one.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
