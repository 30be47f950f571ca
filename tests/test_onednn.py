"""The oneDNN convolution kernel (models/kernels) against XLA's, and the fallback without it.

Tolerances, measured on this project's CPU (Sapphire Rapids, AMX) with random weights and inputs:

* float32 through oneDNN vs XLA, one convolution, forward and input gradient: max |delta| /
  max |ref| <= 1.6e-6 (tested at 1e-4 relative);
* bfloat16 through oneDNN (f32 accumulation, f32 out) vs XLA float32, one convolution:
  1.8e-3 .. 3.6e-3 relative (bf16 keeps 8 bits of mantissa: 2^-9 = 2e-3 per rounded operand);
  tested at 1e-2;
* the tiny backbone (stacked convolutions, ReLUs, max pools), B=2, 4 random inputs: taps in bf16
  2.7e-3 .. 4.8e-3 max-relative (tested at 1e-2); the dream loss's input gradient through the
  whole network 2.9e-2 .. 5.4e-2 relative L2 (||d|| / ||ref||; tested at 0.1): a bf16-rounded
  activation near a ReLU's or a max pool's switch point sends the gradient another way, so the
  network gradient is the loosest number; its max-relative error (7.6e-2 .. 2.5e-1) is no test.
  float32 through oneDNN: <= 2.8e-7 everywhere (tested at 1e-4).

Tests that need the kernel skip (with the reason) where it cannot be built or loaded; the
fallback tests always run.
"""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dreamjax.engine import dream
from dreamjax.models import kernels, ops
from tests.helpers import missing

RNG = np.random.default_rng(0)
F32_TOL = 1e-4
BF16_TOL = 1e-2
BF16_GRAD_L2_TOL = 0.1


@pytest.fixture(autouse=True)
def every_size_on_onednn(monkeypatch):
    """The test convolutions are tiny: send them to oneDNN whatever their size."""
    monkeypatch.setattr(ops, "ONEDNN_MIN_FLOPS", 0)


def _need_onednn(bf16=False):
    st = kernels.status()
    if not st.available:
        missing(f"oneDNN kernel unavailable: {st.reason}")
    if bf16 and not st.bf16:
        pytest.skip("this CPU has no bfloat16 instructions")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CONVS = [  # input shape, kernel, out, stride, padding
    ((2, 13, 16, 8), (3, 3), 12, 1, "SAME"),
    ((1, 17, 17, 8), (3, 3), 12, 2, "VALID"),
    ((1, 16, 16, 8), (3, 3), 12, 2, "SAME"),  # asymmetric padding (0, 1)
    ((1, 13, 13, 8), (1, 7), 12, 1, "SAME"),
    ((1, 13, 13, 8), (7, 1), 12, 1, "SAME"),
    ((2, 9, 11, 16), (1, 1), 24, 1, "SAME"),  # a matrix product through oneDNN's matmul
    ((1, 9, 9, 16), (1, 1), 24, 2, "VALID"),  # strided 1x1: a convolution
    ((1, 21, 21, 3), (3, 3), 16, 2, "VALID"),  # InceptionV3's stem: 3 channels
]


@pytest.mark.parametrize("shape,kernel,cout,stride,padding", CONVS, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("kern,tol", [("onednn_f32", F32_TOL), ("onednn", BF16_TOL)])
def test_conv2d_forward_and_input_gradient_match_xla(shape, kernel, cout, stride, padding, kern, tol):
    _need_onednn(bf16=kern == "onednn")
    m = ops.Conv2D(cout, kernel, stride, padding)
    x = jnp.asarray(RNG.standard_normal(shape).astype(np.float32))
    v = m.init(jax.random.PRNGKey(0), x)
    ref_v = ops.prepare_dream_variables(m, v, shape, kernels="xla")
    our_v = ops.prepare_dream_variables(m, v, shape, kernels=kern)
    assert ops.dream_kernels(ref_v) == "xla" and ops.dream_kernels(our_v) == kern
    def run(v, x, g):  # (jitted, reference too: op by op its ops were as many small programs)
        y, vjp = jax.vjp(lambda x: m.apply(v, x), x)
        return y, vjp(g)[0]

    g = jnp.asarray(RNG.standard_normal(jax.eval_shape(lambda x: m.apply(ref_v, x), x).shape).astype(np.float32))
    (y_ref, dx_ref), (y, dx) = jax.jit(run)(ref_v, x, g), jax.jit(run)(our_v, x, g)
    assert y.dtype == jnp.float32 and y.shape == y_ref.shape
    assert _rel(y, y_ref) <= tol, f"forward off by {_rel(y, y_ref):.2e}"
    assert dx.dtype == jnp.float32
    assert _rel(dx, dx_ref) <= tol, f"input gradient off by {_rel(dx, dx_ref):.2e}"


DEPTHWISE = [  # input shape, kernel, stride (EfficientNet-Lite's depthwise layers: SAME, multiplier 1)
    ((2, 13, 16, 8), 3, 1),
    ((1, 16, 16, 8), 3, 2),  # asymmetric padding (0, 1); its input gradient dilates g
    ((1, 15, 15, 16), 5, 2),
    ((1, 9, 11, 24), 5, 1),
]


@pytest.mark.parametrize("shape,k,stride", DEPTHWISE, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("kern", ["onednn_f32", "onednn"])
def test_depthwise_convolutions_run_on_onednn_in_float32(shape, k, stride, kern):
    """Depthwise convolutions go to oneDNN in float32 under either oneDNN choice (memory-bound:
    bfloat16 bought nothing there, see ops.Conv2D): forward, input gradient and the kernel's
    gradient all within the float32 tolerance of XLA's slice form."""
    _need_onednn(bf16=kern == "onednn")
    c = shape[-1]
    m = ops.Conv2D(c, (k, k), stride, "SAME", feature_group_count=c)
    x = jnp.asarray(RNG.standard_normal(shape).astype(np.float32))
    v = m.init(jax.random.PRNGKey(0), x)
    ref_v = ops.prepare_dream_variables(m, v, shape, kernels="xla")
    our_v = ops.prepare_dream_variables(m, v, shape, kernels=kern)
    assert "kernel_dw_onednn" not in ref_v[ops.DREAM]
    assert our_v[ops.DREAM]["kernel_dw_onednn"].dtype == jnp.float32
    fwd = jax.jit(lambda v, x: jax.vjp(lambda v, x: m.apply(v, x), v, x))
    assert kernels.TARGET in fwd.lower(our_v, x).as_text()
    assert kernels.TARGET not in fwd.lower(ref_v, x).as_text()
    # (jitted, both: op by op, the slice form's 25 shifted slices and their gradients were as many
    # small programs)
    def run(v, x, g):
        y, vjp = jax.vjp(lambda p, x: m.apply({**v, "params": p}, x), v["params"], x)
        return y, vjp(g)

    g = jnp.asarray(RNG.standard_normal(m.apply(ref_v, x).shape).astype(np.float32))
    y_ref, (dk_ref, dx_ref) = jax.jit(run)(ref_v, x, g)
    y, (dk, dx) = jax.jit(run)(our_v, x, g)
    assert _rel(y, y_ref) <= F32_TOL, f"forward off by {_rel(y, y_ref):.2e}"
    assert _rel(dx, dx_ref) <= F32_TOL, f"input gradient off by {_rel(dx, dx_ref):.2e}"
    assert _rel(dk["kernel"], dk_ref["kernel"]) <= F32_TOL


def test_reordered_weights_are_cached_by_content_never_stale():
    """The blocked copies of the weights are reused only for the same bytes: new values in an array
    of the same shape (possibly at the same address) give their own, correct result."""
    _need_onednn()
    x = jnp.asarray(RNG.standard_normal((1, 11, 11, 16)).astype(np.float32))
    pads = ((1, 1), (1, 1))
    call = jax.jit(lambda x, w: kernels.conv(x, w, None, (1, 1), pads))
    before = kernels.cached_weights()
    for trial in range(3):
        w = jnp.asarray(RNG.standard_normal((3, 3, 16, 24)).astype(np.float32))
        ref = lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=ops.DN, precision="highest")
        for _ in range(2):  # the second call takes the cached copy
            assert _rel(call(x, w), ref) <= F32_TOL, trial
        del w
    # one blocked copy per distinct weight content (oneDNN's f32 3x3 convolutions take blocked weights)
    assert kernels.cached_weights() - before == 3


def test_bias_and_relu_post_ops():
    _need_onednn()
    x = jnp.asarray(RNG.standard_normal((1, 9, 9, 8)).astype(np.float32))
    w = jnp.asarray(RNG.standard_normal((3, 3, 8, 5)).astype(np.float32))
    b = jnp.asarray(RNG.standard_normal(5).astype(np.float32))
    for k in [(3, 3), (1, 1)]:
        wk = w[:k[0], :k[1]]
        pads = ((k[0] // 2,) * 2, (k[1] // 2,) * 2)
        ref = jax.nn.relu(lax.conv_general_dilated(x, wk, (1, 1), pads, dimension_numbers=ops.DN,
                                                   precision="highest") + b)
        assert _rel(kernels.conv(x, wk, b, (1, 1), pads, relu=True), ref) <= F32_TOL


FUSED = [  # InceptionV3 ConvBN specs: (name, filters, kh, kw, stride, padding)
    ("c", 12, 3, 3, 2, "VALID"), ("c", 12, 3, 3, 1, "SAME"), ("c", 24, 1, 1, 1, "VALID"), ("c", 12, 1, 7, 1, "SAME"),
]


@pytest.mark.parametrize("spec", FUSED, ids=lambda v: f"{v[2]}x{v[3]}s{v[4]}{v[5]}")
@pytest.mark.parametrize("kern,tol", [("onednn_f32", F32_TOL), ("onednn", BF16_TOL)])
def test_conv_batchnorm_relu_as_one_onednn_call(spec, kern, tol):
    """InceptionV3's conv -> BatchNorm -> ReLU with the BatchNorm folded into the oneDNN kernel and
    the ReLU a post-op (ops.conv_affine): forward, input gradient and parameter gradients vs XLA.

    Measured: f32 forward and input gradient <= 3.7e-7 max-relative; bf16 forward 2.4e-3 .. 3.2e-3;
    the bf16 input gradient 9e-2 .. 0.15 max-relative, 2.3e-2 .. 4.9e-2 relative L2, all of it from
    outputs within bf16 rounding of 0 that land on the other side of the ReLU: with the ReLU mask of
    the bf16 forward pass the XLA gradient is within the single-convolution bf16 tolerance."""
    from dreamjax.models import inception_v3 as iv3

    _need_onednn(bf16=kern == "onednn")
    m = iv3.ConvBN(iv3._c(*spec))
    x = jnp.asarray(RNG.standard_normal((2, 17, 15, 8)).astype(np.float32))
    v = m.init(jax.random.PRNGKey(0), x)
    # non-trivial BatchNorm statistics and shift
    v = jax.tree_util.tree_map(lambda a: a + jnp.asarray(RNG.uniform(0.1, 0.5, a.shape).astype(np.float32)), v)
    ref_v = ops.prepare_dream_variables(m, v, x.shape, kernels="xla")
    assert "fused_kernel" not in ref_v.get("dream", {})
    our = ops.prepare_dream_variables(m, v, x.shape, kernels=kern)
    d = our["dream"]
    assert set(d) == {"conv", "fused_kernel", "fused_kernel_bwd", "fused_shift"}, d.keys()
    assert set(d["conv"]) == {"kernel_bwd"}  # the conv's own oneDNN copies were replaced
    assert ops.dream_kernels(our) == kern
    y_ref, vjp_ref = jax.jit(lambda x: jax.vjp(lambda x: m.apply(ref_v, x), x))(x)  # (jitted, as above)
    y, vjp = jax.jit(lambda x: jax.vjp(lambda x: m.apply(our, x), x))(x)
    g = jnp.asarray(RNG.standard_normal(y_ref.shape).astype(np.float32))
    assert _rel(y, y_ref) <= tol, _rel(y, y_ref)
    dx = vjp(g)[0]
    if kern == "onednn_f32":
        assert _rel(dx, vjp_ref(g)[0]) <= tol, _rel(dx, vjp_ref(g)[0])
    else:
        assert _rel_l2(dx, vjp_ref(g)[0]) <= BF16_GRAD_L2_TOL, _rel_l2(dx, vjp_ref(g)[0])
        # XLA's gradient of conv -> BatchNorm under our ReLU mask
        p, st = v["params"], v["batch_stats"]["bn"]
        inv = lax.rsqrt(st["var"] + 1e-3)
        strides = (m.spec.strides,) * 2
        pads = ops._pads(x.shape[1:3], m.spec.kernel, strides, m.spec.padding)
        linear = jax.vjp(lambda x: ops._conv_affine_reference(
            x, p["conv"]["kernel"], inv, p["bn"]["bias"] - st["mean"] * inv, strides, pads, relu=False), x)[1]
        same_mask = linear(jnp.where(y > 0, g, 0.0))[0]
        assert _rel(dx, same_mask) <= tol, _rel(dx, same_mask)
    # parameter gradients (never needed in a dream) stay JAX's
    pr = jax.jit(jax.grad(lambda p: (m.apply({**ref_v, "params": p}, x) * g).sum()))(v["params"])
    po = jax.jit(jax.grad(lambda p: (m.apply({**our, "params": p}, x) * g).sum()))(v["params"])
    for a, b in zip(jax.tree_util.tree_leaves(po), jax.tree_util.tree_leaves(pr)):
        assert float(jnp.abs(b).max()) > 0 and _rel(a, b) <= 1e-4


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (2, 8)])
def test_strided_input_gradients_run_onednn_backward_data(stride, groups):
    """A strided convolution's input gradient is oneDNN's backward-data primitive on the forward
    kernel (no gradient dilated by the stride, no XLA pad to make it); stride 1 stays a forward
    convolution with the backward kernel. Values: the CONVS / FUSED / DEPTHWISE tests above."""
    _need_onednn()
    x = jnp.asarray(RNG.standard_normal((1, 17, 17, 8)).astype(np.float32))
    m = ops.Conv2D(8, (3, 3), stride, "SAME", feature_group_count=groups)
    v = m.init(jax.random.PRNGKey(0), x)
    our = ops.prepare_dream_variables(m, v, x.shape, kernels="onednn_f32")
    ref_v = ops.prepare_dream_variables(m, v, x.shape, kernels="xla")
    grad = jax.jit(jax.grad(lambda x: (m.apply(our, x) ** 2).sum()))
    assert ("backward_data = true" in grad.lower(x).as_text()) == (stride > 1)
    ref = jax.grad(lambda x: (m.apply(ref_v, x) ** 2).sum())(x)
    assert _rel(grad(x), ref) <= F32_TOL, _rel(grad(x), ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_relu_mask_inside_the_call_is_the_same_bits(dtype, stride):
    """An input gradient masked by a ReLU inside the call (oneDNN's ReLU backward into a scratch
    buffer, then the convolution) equals XLA's select before the call, bit for bit, zeros and
    exact-zero activations included; both directions (forward with the backward kernel at stride
    1, backward data at stride 2)."""
    _need_onednn(bf16=dtype == jnp.bfloat16)
    g = jnp.asarray(RNG.standard_normal((2, 9, 7, 16)), dtype)
    y = jnp.asarray(np.maximum(np.round(RNG.standard_normal((2, 9, 7, 16)), 1), 0.0), dtype)  # many exact zeros
    k = jnp.asarray(RNG.standard_normal((3, 3, 16, 8) if stride == 1 else (3, 3, 8, 16)) * 0.2, dtype)
    pads = ((1, 1), (1, 1))
    if stride == 1:
        def call(g, y, mask):
            return kernels.conv(g if mask else jnp.where(y > 0, g, jnp.zeros((), dtype)), k, None, (1, 1), pads,
                                mask=y if mask else None)
    else:
        def call(g, y, mask):
            return kernels.conv_backward_data(g if mask else jnp.where(y > 0, g, jnp.zeros((), dtype)), k,
                                              (2, 18, 14, 8), (2, 2), ((1, 0), (1, 0)), mask=y if mask else None)
    assert "masked = true" in jax.jit(lambda g, y: call(g, y, True)).lower(g, y).as_text()
    ours, ref = jax.jit(lambda g, y: call(g, y, True))(g, y), jax.jit(lambda g, y: call(g, y, False))(g, y)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert float(jnp.abs(ref).sum()) > 0 and float(jnp.abs(call(g, y, False) - call(g, g, False)).max()) > 0


def test_bf16_hand_over_masks_inside_the_call_f32_outputs_in_xla(monkeypatch):
    """Inside an Inception branch (bfloat16 hand-over) the ReLU mask of the input gradient is the
    call's; where the activation is float32 (it goes to the block's concatenation) and the kernels
    bfloat16, XLA's select (fused with the cast) stays. The dream gradient is the same bits either
    way."""
    from dreamjax import load_backbone

    _need_onednn(bf16=True)
    monkeypatch.setattr(ops, "ONEDNN_MIN_FLOPS", 0)
    bb = load_backbone("inception_v3", weights="random")
    x = jnp.asarray(RNG.uniform(-1, 1, (1, 80, 80, 3)).astype(np.float32))
    v = ops.prepare_dream_variables(bb.module, bb.variables, x.shape, kernels="onednn")

    def grad_fn():
        return jax.jit(jax.grad(lambda x: (bb.module.apply(v, x, taps=("mixed0",))[1]["mixed0"] ** 2).sum()))

    ours = grad_fn()
    text = ours.lower(x).as_text()
    assert 0 < text.count("masked = true") < text.count("masked = false"), text.count("masked = true")
    monkeypatch.setattr(ops, "MASK_IN_CALL", False)
    ref = grad_fn()
    assert "masked = true" not in ref.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ref(x)))


@pytest.mark.parametrize("shape,window,stride", [((2, 17, 15, 8), 3, 2), ((1, 12, 12, 5), 2, 2), ((1, 9, 9, 3), 3, 1)])
def test_max_pool_gradient_as_a_call_is_the_same_bits(shape, window, stride):
    """The oneDNN path's max-pool input gradient (one call of the extension: XLA's pad form gets the
    whole producer of g fused into each of its reads) equals XLA's pad form bit for bit, ties
    included (integer-valued inputs: many equal maxima in a window)."""
    _need_onednn()
    x = jnp.asarray(np.round(RNG.standard_normal(shape) * 2).astype(np.float32))
    y, vjp = jax.vjp(lambda x: ops.max_pool(x, window, stride), x)
    g = jnp.asarray(RNG.standard_normal(y.shape).astype(np.float32))
    call = jax.jit(lambda x, g: jax.vjp(lambda x: ops.max_pool(x, window, stride, True), x)[1](g)[0])
    assert kernels.MAXPOOL_BWD in call.lower(x, g).as_text()
    np.testing.assert_array_equal(np.asarray(call(x, g)), np.asarray(vjp(g)[0]))
    assert float(jnp.abs(vjp(g)[0]).sum()) > 0


def test_inception_on_onednn_takes_the_max_pool_call():
    from dreamjax import load_backbone

    _need_onednn()
    bb = load_backbone("inception_v3", weights="random")
    x = jnp.zeros((1, 80, 80, 3), jnp.float32)
    for kern, expect in [("onednn_f32", True), ("xla", False)]:
        v = ops.prepare_dream_variables(bb.module, bb.variables, x.shape, kernels=kern)
        grad = jax.jit(jax.grad(lambda x, v=v: bb.module.apply(v, x, taps=("mixed0",))[1]["mixed0"].sum()))
        assert (kernels.MAXPOOL_BWD in grad.lower(x).as_text()) == expect, kern


class _Chain(nn.Module):
    """Two InceptionV3 ConvBNs in a branch: the first one's activation goes only to the second."""

    chain: bool = True

    @nn.compact
    def __call__(self, x):
        from dreamjax.models import inception_v3 as iv3

        b = iv3._c("b", 12, 1, 3)  # 0.74 MFLOP at 2x19x17x16; a: 1.49 MFLOP
        x = iv3.ConvBN(iv3._c("a", 16, 3, 3), feeds=b if self.chain else None, name="a")(x)
        return iv3.ConvBN(b, name="b")(x)


@pytest.mark.parametrize("min_flops,hand_over_expected", [(0, True), (1e6, False)])
def test_a_convolution_feeding_a_convolution_hands_over_bfloat16_bit_for_bit(monkeypatch, min_flops,
                                                                             hand_over_expected):
    """With bfloat16 kernels an activation that goes only into the next convolution is written
    as bfloat16 by oneDNN (half the bytes, no cast), which that convolution would have rounded
    it to anyway: the dream's forward pass and input gradient are the same bits as with the
    float32 hand-over; the hand-over really is bfloat16 in the program. Where the next
    convolution is too small for oneDNN (XLA reads its input in float32) there is no hand-over."""
    _need_onednn(bf16=True)
    monkeypatch.setattr(ops, "ONEDNN_MIN_FLOPS", min_flops)
    x = jnp.asarray(RNG.standard_normal((2, 19, 17, 8)).astype(np.float32))
    chained, plain = _Chain(True), _Chain(False)
    v = chained.init(jax.random.PRNGKey(0), x)
    v = jax.tree_util.tree_map(lambda a: a + jnp.asarray(RNG.uniform(0.1, 0.5, a.shape).astype(np.float32)), v)
    ours = ops.prepare_dream_variables(chained, v, x.shape, kernels="onednn")
    g = jnp.asarray(RNG.standard_normal((2, 19, 17, 12)).astype(np.float32))
    out = {}
    for name, m in [("chained", chained), ("plain", plain)]:
        f = jax.jit(lambda x, m=m: jax.vjp(lambda x: m.apply(ours, x), x)[1](g)[0])
        y = jax.jit(lambda x, m=m: m.apply(ours, x))(x)
        out[name] = (np.asarray(y), np.asarray(f(x)))
        hand_over = any(kernels.TARGET in line and line.rstrip().endswith("-> tensor<2x19x17x16xbf16>")
                        for line in f.lower(x).as_text().splitlines())
        assert hand_over == (name == "chained" and hand_over_expected), name
    assert out["chained"][0].dtype == np.float32
    np.testing.assert_array_equal(out["chained"][0], out["plain"][0])
    np.testing.assert_array_equal(out["chained"][1], out["plain"][1])
    ref = jax.vjp(lambda x: chained.apply(ops.prepare_dream_variables(chained, v, x.shape, kernels="xla"), x), x)
    assert _rel_l2(out["chained"][1], ref[1](g)[0]) <= BF16_GRAD_L2_TOL


def test_tiny_backbone_dream_gradient_under_jit_and_while_loop(tiny_backbone):
    """Taps and the dream loss's input gradient through the whole (tiny) network, B=2, and the
    same gradient ascent inside ``lax.while_loop``: oneDNN f32 / bf16 vs XLA."""
    _need_onednn()
    taps = ("conv2", "conv3", "conv4")
    f = tiny_backbone.feature_fn(taps, straight_through=True)
    x = jnp.asarray(RNG.uniform(-1, 1, (2, 40, 48, 3)).astype(np.float32))

    def loss(v, x):
        a = f(v, x)
        return sum(jnp.mean(jnp.square(a[t])) for t in taps)

    def ascent(v, x):
        def body(c):
            i, x = c
            g = jax.grad(loss, argnums=1)(v, x)
            return i + 1, x + 0.01 * g / (jnp.abs(g).mean() + 1e-8)
        return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    ref_v = tiny_backbone.dream_variables_for("xla")
    acts_ref = jax.jit(f)(ref_v, x)  # (jitted: op by op, each layer's ops were small programs)
    g_ref = jax.jit(jax.grad(loss, argnums=1))(ref_v, x)
    x_ref = jax.jit(ascent)(ref_v, x)
    kinds = [("onednn_f32", F32_TOL, F32_TOL)]
    if kernels.status().bf16:
        kinds.append(("onednn", BF16_TOL, BF16_GRAD_L2_TOL))
    for kern, tol, grad_tol in kinds:
        v = tiny_backbone.dream_variables_for(kern)
        acts = jax.jit(f)(v, x)
        for t in taps:
            assert _rel(acts[t], acts_ref[t]) <= tol, (kern, t, _rel(acts[t], acts_ref[t]))
        g = jax.jit(jax.grad(loss, argnums=1))(v, x)
        assert _rel_l2(g, g_ref) <= grad_tol, (kern, _rel_l2(g, g_ref))
        xs = jax.jit(ascent)(v, x)
        assert _rel_l2(xs - x, x_ref - x) <= grad_tol, (kern, "while_loop", _rel_l2(xs - x, x_ref - x))


def test_dreamer_runs_the_octave_loop_on_onednn(tiny_backbone):
    _need_onednn()
    plan = dream.OctavePlan.keras(2, 1.4)
    params = dream.CellParams.make(np.ones((2, 3), np.float32), 0.05, iterations=4, seed=[0, 1])
    images = RNG.uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)
    finals = {}
    for kern in ("xla", "onednn_f32"):
        cfg = dream.DreamConfig(taps=("conv2", "conv3", "conv4"), border=0, cpu_kernels=kern)
        d = dream.Dreamer(tiny_backbone, cfg, plan, 4)
        assert ops.dream_kernels(d.variables) == kern
        finals[kern] = dream.DreamRun(d, images, params).run().final
    assert _rel(finals["onednn_f32"] - images, finals["xla"] - images) <= F32_TOL


# ---------------------------------------------------------------------------------------------
# Without the extension: XLA runs, one log line; asking for oneDNN is one clear error.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_onednn(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    monkeypatch.setattr(kernels, "_status", None)
    monkeypatch.setattr(ops, "_told_fallback", [])
    yield
    kernels._status = None  # the real status is found again by the next caller


def test_small_convolutions_stay_on_xla(monkeypatch):
    _need_onednn()
    monkeypatch.setattr(ops, "ONEDNN_MIN_FLOPS", 1e12)
    m = ops.Conv2D(4, (3, 3))
    x = jnp.ones((1, 8, 8, 3), jnp.float32)
    v = ops.prepare_dream_variables(m, m.init(jax.random.PRNGKey(0), x), x.shape, kernels="onednn")
    hlo = jax.jit(jax.value_and_grad(lambda x: m.apply(v, x).sum())).lower(x).as_text()
    assert kernels.TARGET not in hlo
    monkeypatch.setattr(ops, "ONEDNN_MIN_FLOPS", 0)
    hlo = jax.jit(jax.value_and_grad(lambda x: m.apply(v, x).sum())).lower(x).as_text()
    assert hlo.count(kernels.TARGET) == 2, "forward and input gradient"


def test_fallback_to_xla_when_the_extension_is_absent(no_onednn, tiny_backbone, caplog):
    with caplog.at_level(logging.WARNING, logger="dreamjax.models.ops"):
        assert ops.resolve_kernels("auto", "cpu") == "xla"
    assert "XLA convolutions run instead" in caplog.text and kernels.DISABLE_ENV in caplog.text
    with pytest.raises(ops.KernelsUnavailable, match="cpu_kernels=onednn cannot run here"):
        ops.resolve_kernels("onednn", "cpu")
    cfg = dream.DreamConfig(taps=("conv2",), cpu_kernels="onednn")
    with pytest.raises(dream.ConfigError, match="cannot run here"):
        dream.Dreamer(tiny_backbone, cfg, dream.OctavePlan.keras(1, 1.4), 2)
    # auto still dreams (on XLA)
    d = dream.Dreamer(tiny_backbone, dream.DreamConfig(taps=("conv2",), cpu_kernels="auto"),
                      dream.OctavePlan.keras(1, 1.4), 2)
    assert ops.dream_kernels(d.variables) == "xla"
    params = dream.CellParams.make(np.ones((1, 1), np.float32), 0.05, iterations=2)
    assert np.isfinite(dream.DreamRun(d, RNG.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32),
                                      params).run().final).all()


def test_failed_build_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    """No compiler (or a compile error) -> status says why; nothing raises."""
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_status", None)
    try:
        st = kernels.status()
    finally:
        kernels._status = None
    assert not st.available
    assert "not built" in st.reason
    assert not list((tmp_path / "kernels").glob("*.so")), "a failed build leaves no library behind"


def test_other_platforms_and_bad_choices():
    assert ops.resolve_kernels("xla") == "xla"
    assert ops.resolve_kernels("auto", "cpu", devices=2) == "xla"  # no partitioning rule for the call
    with pytest.raises(ops.KernelsUnavailable, match="one device only"):
        ops.resolve_kernels("onednn", "cpu", devices=2)
    assert ops.resolve_kernels("auto", "gpu") == "xla"
    with pytest.raises(ops.KernelsUnavailable, match="CPUs only"):
        ops.resolve_kernels("onednn", "gpu")
    with pytest.raises(ValueError, match="expected one of"):
        ops.resolve_kernels("mkl")
    with pytest.raises(dream.ConfigError, match="dream.cpu_kernels"):
        dream.DreamConfig(taps=("conv2",), cpu_kernels="mkl")


def test_config_schema_offers_the_kernels_ops_knows():
    from dreamjax import config

    assert config.CPU_KERNELS == ops.KERNELS


def test_library_name_follows_source_jaxlib_and_onednn():
    try:
        path = kernels.library_path()
    except Exception as e:  # noqa: BLE001 - no oneDNN wheel: nothing to name
        missing(f"oneDNN not installed: {e}")
    assert path.name.startswith("onednn_conv-") and path.suffix == ".so"
    assert path == kernels.library_path()
