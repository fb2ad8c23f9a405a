"""mmd.py's Algorithm 2 auxiliary, distillation inputs and z_s draws against references that do not
use mmd.py: closed-form Gaussian conditioning on a linear-Gaussian toy, finite differences, the
schedule's closed-form CDF (scipy's Kolmogorov-Smirnov test), Monte Carlo moments; and the shift
from the command line to the losses' settings."""

import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.flatten_util import ravel_pytree

import mmd
import train
from uvit import MLPDenoiser

F32 = jnp.float32
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def test_the_suite_runs_on_the_cpu_with_eight_fake_devices():
    """conftest.py forces the CPU platform: on a machine with an accelerator the exact comparisons
    and the 8 fake devices would otherwise silently test another backend."""
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8
