"""dreamjax.models.ops: the dream path's convolution and pools equal Flax's, values and gradients.

Inputs with many exact ties (small integers) check that the slice-based max pool hands the
gradient to the same element as ``reduce_window``'s ``select_and_scatter``.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import load_backbone
from dreamjax.models import ops

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(2, 17, 19, 5), (1, 8, 9, 3), (1, 3, 3, 2)])
def test_max_pool_equals_reduce_window_with_ties(shape):
    x = jnp.asarray(RNG.integers(0, 3, shape).astype(np.float32))
    ref = jax.jit(lambda x: nn.max_pool(x, (3, 3), (2, 2), "VALID"))  # (jitted: op by op, every slice
    ours = jax.jit(lambda x: ops.max_pool(x, 3, 2))  # and select was a small program of its own)
    assert np.array_equal(ours(x), ref(x))

    def grads(g):
        return jax.jit(lambda x, g: (jax.vjp(ref, x)[1](g)[0], jax.vjp(ours, x)[1](g)[0]))(x, g)

    # Integer cotangents: sums are exact in any order, so any difference is a different argmax.
    gr, go = grads(jnp.asarray(RNG.integers(-50, 50, ref(x).shape).astype(np.float32)))
    assert np.array_equal(go, gr), "gradient went to a different maximum"
    gr, go = grads(jnp.asarray(RNG.standard_normal(ref(x).shape).astype(np.float32)))  # real-valued: rounding
    np.testing.assert_allclose(go, gr, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 17, 19, 5), (1, 1, 4, 3), (1, 2, 2, 1)])
def test_avg_pool_same_excludes_padding_like_keras(shape):
    x = jnp.asarray(RNG.standard_normal(shape).astype(np.float32))
    ref = lambda x: nn.avg_pool(x, (3, 3), (1, 1), "SAME", count_include_pad=False)  # noqa: E731
    ours = functools.partial(ops.avg_pool_same, window=3)
    np.testing.assert_allclose(jax.jit(ours)(x), jax.jit(ref)(x), rtol=0, atol=1e-6)
    g = jnp.asarray(RNG.standard_normal(shape).astype(np.float32))
    go, gr = jax.jit(lambda x, g: (jax.vjp(ours, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0]))(x, g)  # (jitted, as above)
    np.testing.assert_allclose(go, gr, atol=1e-6)


CONVS = [  # kernel, in, out, stride, padding, groups
    ((3, 3), 4, 6, 1, "SAME", 1), ((3, 3), 4, 6, 2, "VALID", 1), ((1, 1), 4, 6, 1, "VALID", 1),
    ((1, 1), 4, 6, 1, "SAME", 1), ((1, 7), 4, 6, 1, "SAME", 1), ((7, 1), 5, 3, 1, "SAME", 1),
    ((3, 3), 5, 6, 2, "SAME", 1), ((5, 5), 6, 6, 2, "SAME", 6), ((3, 3), 6, 6, 1, "SAME", 6),
    ((3, 3), 4, 8, 1, "SAME", 2),  # grouped, not depthwise: no backward kernel, autodiff path
]


@pytest.mark.parametrize("kernel,cin,cout,stride,padding,groups", CONVS,
                         ids=lambda v: str(v).replace(" ", ""))
def test_conv2d_matches_nn_conv_values_and_gradients(kernel, cin, cout, stride, padding, groups):
    x = jnp.asarray(RNG.standard_normal((2, 13, 16, cin)).astype(np.float32))
    ours = ops.Conv2D(cout, kernel, stride, padding, groups)
    ref = nn.Conv(cout, kernel, stride, padding=padding, feature_group_count=groups, use_bias=False)
    v = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(v)
    vd = ops.prepare_dream_variables(ours, v, x.shape)
    assert ("dream" in vd) == ops.supports_backward_kernel((*kernel, cin // groups, cout), groups)
    assert np.array_equal(ours.apply(v, x), ref.apply(v, x)), "without the dream collection it is nn.Conv"
    np.testing.assert_allclose(ours.apply(vd, x), ref.apply(v, x), rtol=0, atol=1e-5)

    def loss(m, variables):
        return lambda x, p: jnp.sum(jnp.sin(m.apply({**variables, "params": p}, x)))

    gx_ref, gk_ref = jax.jit(jax.grad(loss(ref, v), argnums=(0, 1)))(x, v["params"])
    gx, gk = jax.jit(jax.grad(loss(ours, vd), argnums=(0, 1)))(x, v["params"])
    scale = float(jnp.abs(gx_ref).max())
    np.testing.assert_allclose(gx, gx_ref, rtol=0, atol=1e-6 * scale)
    # The kernel's own gradient stays right even on the dream path (JAX's rule, when asked for).
    np.testing.assert_allclose(gk["kernel"], gk_ref["kernel"], rtol=0,
                               atol=1e-5 * float(jnp.abs(gk_ref["kernel"]).max()))


def test_backward_kernel_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="grouped"):
        ops.backward_kernel(jnp.zeros((3, 3, 2, 8)), groups=2)


@pytest.mark.parametrize("name,size,taps", [("efficientnet_lite0", 64, ("block5", "block8_dwpre")),
                                            ("tiny", 48, ("conv2", "conv3"))])
def test_backbone_dream_variables_give_the_same_gradient(name, size, taps):
    bb = load_backbone(name, weights="random" if name == "efficientnet_lite0" else "auto")
    dv = bb.dream_variables
    assert bb.dream_variables is dv, "made once per backbone"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(bb.variables["params"])]
    n_convs = sum(p.endswith("['kernel']") and "conv" in p for p in paths)
    assert len(jax.tree_util.tree_leaves(dv["dream"])) == n_convs > 0, "one backward kernel per convolution"
    f = bb.feature_fn(taps, straight_through=True)
    x = jnp.asarray(RNG.uniform(-1, 1, (2, size, size + 8, 3)).astype(np.float32))
    grad = jax.jit(jax.grad(lambda v, x: sum(jnp.mean(a ** 2) for a in f(v, x).values()), argnums=1))
    g0, g1 = grad(bb.variables, x), grad(dv, x)
    assert float(jnp.abs(g0).max()) > 0
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5 * float(jnp.abs(g0).max()))
