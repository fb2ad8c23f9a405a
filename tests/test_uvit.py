"""Tests for uvit.py: shapes per preset, parameter counts, gradients, per-example independence,
conditioning, the v -> x wrapper, bf16 compute and remat. Most run a tiny config; the imagenet
presets only via eval_shape."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uvit

TINY = uvit.UViTConfig(
    resolution=16,
    channels=3,
    num_classes=5,
    widths=(16, 32),
    blocks=(1, 2),
    transformer_width=32,
    transformer_depth=2,
    heads=2,
    emb_width=24,
    groups=8,
)


def inputs(config, batch, key):
    kz, kl, kc = jax.random.split(key, 3)
    z = jax.random.normal(kz, (batch, config.resolution, config.resolution, config.channels))
    lam = jax.random.uniform(kl, (batch,), minval=-15.0, maxval=15.0)
    label = jax.random.randint(kc, (batch,), 0, config.num_classes + 1)
    return z, lam, label


def perturbed_model(config, key):
    """A fresh model with noise added to every parameter, so zero-initialised layers stop hiding
    dependencies.

    Built eagerly: XLA compiles the random initialisers of a whole model far slower than it runs
    them op by op, and the eager op cache makes a second build (e.g. the remat variant) nearly
    free."""
    k_model, k_noise = jax.random.split(key)
    params, static = eqx.partition(uvit.make_model(config, key=k_model), eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    noisy = [
        p + 0.1 * jax.random.normal(k, p.shape)
        for p, k in zip(leaves, jax.random.split(k_noise, len(leaves)))
    ]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), static)


@eqx.filter_jit
@eqx.filter_value_and_grad
def loss_and_grad(model, z, lam, label, target):
    return jnp.mean(jnp.square(model(z, lam, label) - target))


@eqx.filter_jit
def apply(model, *args):
    return model(*args)


def np_alpha_sigma(lam):
    lam = np.asarray(lam, np.float64)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


@pytest.mark.parametrize("name", sorted(uvit.PRESETS))
def test_preset_output_shape_and_dtype(name):
    config = uvit.PRESETS[name]
    model = eqx.filter_eval_shape(uvit.make_model, name, key=jax.random.key(0))
    z = jax.ShapeDtypeStruct(
        (2, config.resolution, config.resolution, config.channels), jnp.float32
    )
    lam, label = jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    out = eqx.filter_eval_shape(lambda m, *a: m(*a), model, z, lam, label)
    assert out.shape == z.shape and out.dtype == jnp.float32


def test_mnist_runs_and_starts_at_zero_v():
    """Zero-initialised output head: the initial v is exactly 0, so x_pred = alpha z."""
    config = uvit.PRESETS["mnist"]
    model = uvit.make_model("mnist", key=jax.random.key(0))
    n = uvit.param_count(model)
    print(f"mnist parameters: {n:,}")
    assert 1_000_000 <= n <= 3_000_000
    z, lam, label = inputs(config, 2, jax.random.key(1))
    x = apply(model, z, lam, label)
    alpha, _ = np_alpha_sigma(lam)
    assert x.shape == (2, 32, 32, 1) and x.dtype == jnp.float32
    np.testing.assert_allclose(x, alpha[:, None, None, None] * np.asarray(z), rtol=1e-6, atol=1e-6)


def test_imagenet_parameter_counts_near_400m():
    for name in ("imagenet64", "imagenet128"):
        n = uvit.param_count(eqx.filter_eval_shape(uvit.make_model, name, key=jax.random.key(0)))
        print(f"{name} parameters: {n:,}")
        assert abs(n - 400e6) <= 0.1 * 400e6


def test_param_count_matches_closed_form_and_real_arrays():
    d, e = TINY.transformer_width, TINY.emb_width
    block = uvit.TransformerBlock(TINY, key=jax.random.key(0))
    # cond e->4d, qkv d->3d, attn_out d->d, mlp d->4d->d, each with bias.
    assert uvit.param_count(block) == 4 * d * e + 4 * d + 12 * d * d + 9 * d
    model = uvit.make_model(TINY, key=jax.random.key(0))
    shapes = eqx.filter_eval_shape(uvit.make_model, TINY, key=jax.random.key(0))
    assert uvit.param_count(shapes) == sum(
        np.size(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))
    )


def test_gradient_finite_and_matches_finite_differences():
    model = perturbed_model(TINY, jax.random.key(0))
    z, lam, label = inputs(TINY, 2, jax.random.key(2))
    target = jax.random.normal(jax.random.key(3), z.shape)
    grads = eqx.filter(loss_and_grad(model, z, lam, label, target)[1], eqx.is_array)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    squared_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads))

    def loss_along_gradient(h):
        moved = eqx.apply_updates(
            model, jax.tree.map(lambda g: h * g / np.sqrt(squared_norm), grads)
        )
        return float(jnp.mean(jnp.square(apply(moved, z, lam, label) - target)))

    # Along the unit gradient direction the directional derivative is the gradient's norm.
    h = 1e-2
    central_difference = (loss_along_gradient(h) - loss_along_gradient(-h)) / (2 * h)
    np.testing.assert_allclose(central_difference, np.sqrt(squared_norm), rtol=2e-2)


def test_examples_do_not_interact():
    model = perturbed_model(TINY, jax.random.key(0))
    z, lam, label = inputs(TINY, 4, jax.random.key(2))
    z2, lam2, label2 = inputs(TINY, 4, jax.random.key(3))

    def f(*args):
        return apply(model, *args)

    first = f(z, lam, label)[0]
    other = f(z.at[1:].set(z2[1:] * 3.0), lam.at[1:].set(lam2[1:]), label.at[1:].set(label2[1:]))[0]
    alone = f(z[:1], lam[:1], label[:1])[0]
    np.testing.assert_allclose(other, first, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alone, first, rtol=1e-5, atol=1e-5)


def test_label_and_null_label_change_the_output():
    model = perturbed_model(TINY, jax.random.key(0))
    z, lam, _ = inputs(TINY, 2, jax.random.key(2))
    outs = [apply(model, z, lam, jnp.full((2,), c, jnp.int32)) for c in (0, 1, TINY.num_classes)]
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert float(jnp.max(jnp.abs(outs[a] - outs[b]))) > 1e-3


def test_unconditional_model_has_only_the_null_row():
    config = dataclasses.replace(TINY, num_classes=0)
    model = uvit.make_model(config, key=jax.random.key(0))
    assert model.net.embedding.classes.shape == (1, config.emb_width)
    # The one row is what label 0 (the null label) adds to the conditioning, and it reaches the
    # output.
    model = perturbed_model(config, jax.random.key(0))
    z, lam, _ = inputs(config, 2, jax.random.key(1))
    label = jnp.zeros(2, jnp.int32)
    emb = model.net.embedding
    without = eqx.tree_at(lambda e: e.classes, emb, jnp.zeros_like(emb.classes))
    np.testing.assert_allclose(
        emb(lam, label), without(lam, label) + emb.classes[:1], rtol=1e-6, atol=1e-6
    )
    moved = eqx.tree_at(lambda m: m.net.embedding.classes, model, emb.classes + 1.0)
    out, out_moved = apply(model, z, lam, label), apply(moved, z, lam, label)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.max(jnp.abs(out_moved - out))) > 1e-3


def test_v_to_x_wrapper_is_exact():
    model = perturbed_model(TINY, jax.random.key(0))
    z, lam, label = inputs(TINY, 2, jax.random.key(2))
    v = np.asarray(apply(model.net, z, lam, label), np.float64)
    alpha, sigma = np_alpha_sigma(lam)
    expected = (
        alpha[:, None, None, None] * np.asarray(z, np.float64) - sigma[:, None, None, None] * v
    )
    assert np.max(np.abs(v)) > 0.1
    np.testing.assert_allclose(apply(model, z, lam, label), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_approximates_float32():
    model = perturbed_model(TINY, jax.random.key(0))
    low = perturbed_model(dataclasses.replace(TINY, dtype="bfloat16"), jax.random.key(0))
    z, lam, label = inputs(TINY, 2, jax.random.key(2))
    v32, v16 = apply(model.net, z, lam, label), apply(low.net, z, lam, label)
    assert v16.dtype == jnp.float32
    assert float(jnp.linalg.norm(v16 - v32) / jnp.linalg.norm(v32)) < 0.05


def test_remat_gives_same_output_and_gradients():
    plain = perturbed_model(TINY, jax.random.key(0))
    remat = perturbed_model(dataclasses.replace(TINY, remat=True), jax.random.key(0))
    z, lam, label = inputs(TINY, 2, jax.random.key(2))
    target = jax.random.normal(jax.random.key(3), z.shape)
    (loss_plain, g_plain), (loss_remat, g_remat) = (
        loss_and_grad(m, z, lam, label, target) for m in (plain, remat)
    )
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(g_plain, eqx.is_array)),
        jax.tree.leaves(eqx.filter(g_remat, eqx.is_array)),
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_space_to_depth_layout_and_inverse():
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
    y = uvit.space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(
                y[..., (2 * i + j) * 3 : (2 * i + j + 1) * 3], x[:, i::2, j::2, :]
            )
    np.testing.assert_array_equal(uvit.depth_to_space(y, 2), x)


def test_group_norm_normalises_each_example_and_group():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    y = np.asarray(uvit.GroupNorm(8, groups=2)(x)).reshape(2, 16, 2, 4)
    np.testing.assert_allclose(y.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 3)), 1.0, rtol=1e-4)


def test_bad_inputs_raise_actionable_errors():
    model = eqx.filter_eval_shape(uvit.make_model, TINY, key=jax.random.key(0))
    with pytest.raises(ValueError, match="resize/pad"):
        eqx.filter_eval_shape(
            lambda m, *a: m(*a),
            model,
            jnp.zeros((1, 8, 8, 3)),
            jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32),
        )
    with pytest.raises(ValueError, match="unknown preset"):
        uvit.make_model("cifar", key=jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(TINY, resolution=18)


def test_attention_heads_against_a_loop_over_heads():
    """The block's multi-head attention equals a numpy loop: head i reads columns [i*dh, (i+1)*dh)
    of each of q, k, v (the qkv projection's three d-wide thirds) and writes the same columns of
    the merged output."""
    cfg = dataclasses.replace(TINY, transformer_width=12, heads=3, mlp_ratio=2)
    block = uvit.TransformerBlock(cfg, key=jax.random.key(0))
    block = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), block)
    x = jax.random.normal(jax.random.key(2), (2, 5, 12))
    emb = jax.random.normal(jax.random.key(3), (2, cfg.emb_width))
    out = np.asarray(block(x, emb), np.float64)

    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    d, dh = 12, 4
    cond = f64(emb) @ f64(block.cond.weight) + f64(block.cond.bias)
    scale1, shift1, scale2, shift2 = (cond[:, None, i * d : (i + 1) * d] for i in range(4))

    def norm(a):
        return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)

    qkv = (norm(f64(x)) * (1 + scale1) + shift1) @ f64(block.qkv.weight) + f64(block.qkv.bias)
    merged = np.zeros((2, 5, d))
    for i in range(3):
        q, k, v = (qkv[..., j * d + i * dh : j * d + (i + 1) * dh] for j in range(3))
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        merged[..., i * dh : (i + 1) * dh] = (weights / weights.sum(-1, keepdims=True)) @ v
    h = f64(x) + merged @ f64(block.attn_out.weight) + f64(block.attn_out.bias)
    hidden = (norm(h) * (1 + scale2) + shift2) @ f64(block.mlp_in.weight) + f64(block.mlp_in.bias)
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(hidden, jnp.float32)), np.float64)
    expected = h + gelu @ f64(block.mlp_out.weight) + f64(block.mlp_out.bias)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
