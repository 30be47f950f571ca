"""Convolution and pooling written for the dream path's input gradient.

A dream differentiates the network with respect to its *input*, thousands of times with
the same weights. JAX's transpose rule for a convolution feeds the backward pass the kernel
with its in/out axes swapped and its taps flipped; XLA:CPU's convolution library (YNNPACK)
takes kernels only in the plain ``HWIO`` layout, so every step paid for ~70 transposed kernel
copies (a fifth of an InceptionV3 step at 256 px, ``results/bench/README.md``), and inside a
``while_loop`` XLA kept the swapped layout and fell back to a slow loop emitter instead.

:class:`Conv2D` is a drop-in for ``nn.Conv`` (no bias, same ``kernel`` parameter) that, when
the variables carry a prepared *backward kernel* (collection ``"dream"``, made once per
backbone by :func:`prepare_dream_variables`), computes the input gradient as an ordinary
forward convolution with that kernel. Without the collection it is exactly ``nn.Conv``.
Gradients with respect to the kernel stay correct (computed by JAX's own rule when asked for).

Depthwise convolutions (EfficientNet-Lite0) on the dream path are sums of shifted slices times
the taps, forward and backward: XLA:CPU runs grouped convolutions through a slow generic loop
(95 % of a Lite0 step went there; this made the step 16x faster).

The pools are written as elementwise maxima / sums of strided slices: XLA fuses them into a
single loop (forward and backward; the max pool's gradient on the oneDNN path is a call, see
below), where ``reduce_window`` and its ``select_and_scatter``
gradient run as slow standalone loops on CPU. The max pool keeps ``reduce_window``'s tie rule
(the first maximum in row-major window order gets the gradient), so gradients are identical.

On CPUs the convolutions can run through oneDNN instead of XLA (:mod:`dreamjax.models.kernels`,
an XLA FFI custom call: bfloat16 on AMX / AVX512-BF16 with float32 accumulation, or float32).
Which kernel runs is a property of the dream variables, not of the code above the models:
``prepare_dream_variables(..., kernels="onednn")`` stores each non-grouped convolution's forward
and backward kernels in the kernel's dtype (``kernel_onednn``, ``kernel_bwd_onednn``), and
:class:`Conv2D` takes the oneDNN path when it finds them and the convolution is large enough
(``ONEDNN_MIN_FLOPS``). The input gradient is again a forward convolution with the backward
kernel, so one custom call serves both directions (strided: oneDNN's backward-data primitive on
the forward kernel). Inside an Inception branch an activation that only feeds the next oneDNN
convolution is handed over in bfloat16 (:func:`conv_affine`), and on this path the max pools'
input gradient is a call of the same extension (:func:`max_pool`). Depthwise convolutions take oneDNN in float32
under either oneDNN choice (``kernel_dw_onednn``, at every size): they are memory-bound, bfloat16
bought nothing there, and oneDNN ran them 1-3x faster than the slice form above (which XLA runs).
:func:`resolve_kernels` turns ``auto|xla|onednn|onednn_f32`` into what runs here.
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dreamjax.models import kernels as onednn

log = logging.getLogger(__name__)

DN = ("NHWC", "HWIO", "NHWC")
DREAM = "dream"  # the variables collection holding backward kernels
KERNELS = ("auto", "xla", "onednn", "onednn_f32")  # onednn = bfloat16 products, f32 accumulation


def _pads(in_hw, kernel_hw, strides, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
    return tuple(tuple(p) for p in padding)


def _geometry(conv: "Conv2D", x) -> tuple[tuple[int, int], tuple]:
    """(strides, explicit pads) of ``conv`` applied to ``x`` (NHWC)."""
    strides = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(conv.strides)
    return strides, _pads(x.shape[1:3], tuple(conv.kernel_size), strides, conv.padding)


def _is_pointwise(kernel_shape, strides, pads, groups) -> bool:
    return tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) == (1, 1) and groups == 1 \
        and all(p == (0, 0) for p in pads)


def _is_depthwise(kernel_shape, groups) -> bool:
    return groups > 1 and kernel_shape[2] == 1 and kernel_shape[3] == groups


def _window_slices(x, window, strides):
    """The ``kh*kw`` shifted, strided slices of ``x`` that a ``VALID`` window of size ``window``
    (kh, kw) at ``strides`` reads, in row-major window order (the order ``reduce_window`` uses)."""
    (kh, kw), (sh, sw) = window, strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3]),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _depthwise(x, kernel, strides, pads, dilation=(1, 1)):
    """Depthwise convolution (multiplier 1) as a sum of shifted, strided slices times the taps.

    XLA:CPU runs grouped convolutions through a slow generic loop (an EfficientNet-Lite0 step
    spent 95 % of its time there); this is one fused elementwise loop, 15-30x faster per layer.
    ``dilation`` dilates the *input* (zeros between pixels), which the input gradient of a
    strided convolution needs.
    """
    (plo, phi), (qlo, qhi) = pads
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (plo, phi, dilation[0] - 1), (qlo, qhi, dilation[1] - 1), (0, 0, 0)))
    kh, kw = kernel.shape[:2]
    taps = [kernel[i, j, 0] for i in range(kh) for j in range(kw)]
    return sum(s * t for s, t in zip(_window_slices(xp, (kh, kw), strides), taps))


def _conv(x, kernel, strides, pads, groups, dilation=(1, 1)):
    """``x`` (NHWC) convolved with ``kernel`` (HWIO); ``dilation`` dilates the input."""
    if _is_pointwise(kernel.shape, strides, pads, groups) and tuple(dilation) == (1, 1):
        # A 1x1 convolution is a matrix product; XLA:CPU's dot runs it ~1.5-2x faster.
        return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
    if _is_depthwise(kernel.shape, groups):
        return _depthwise(x, kernel, strides, pads, dilation)
    return lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation=dilation, dimension_numbers=DN,
                                    feature_group_count=groups)


def backward_kernel(kernel, groups: int = 1):
    """The kernel whose forward convolution is the input gradient of ``kernel``'s.

    Taps flipped; for an ordinary convolution the in/out axes swapped (``[kh,kw,O,I]``);
    for a depthwise one (``groups`` = channels, multiplier 1) the same shape.
    """
    if not isinstance(kernel, np.ndarray):
        kernel = jnp.asarray(kernel)
    if not supports_backward_kernel(kernel.shape, groups):
        raise ValueError(f"backward kernel for grouped convolutions needs groups in (1, channels); "
                         f"kernel {kernel.shape}, groups {groups}")
    flipped = kernel[::-1, ::-1]
    return flipped if _is_depthwise(kernel.shape, groups) else flipped.swapaxes(2, 3)


def supports_backward_kernel(kernel_shape, groups: int) -> bool:
    return groups == 1 or _is_depthwise(kernel_shape, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def conv_with_backward_kernel(x, kernel, kernel_bwd, strides, pads, groups, in_hw):
    """``conv(x, kernel)`` whose input gradient is a forward convolution with ``kernel_bwd``."""
    return _conv(x, kernel, strides, pads, groups)


def _fwd(x, kernel, kernel_bwd, strides, pads, groups, in_hw):
    y = _conv(x.value, kernel.value, strides, pads, groups)
    # Keep x only when the kernel's own gradient is wanted (never in a dream).
    saved_x = x.value if kernel.perturbed else None
    return y, (kernel_bwd.value, kernel.value if kernel.perturbed else None, saved_x)


def _bwd(strides, pads, groups, in_hw, res, g):
    kernel_bwd, kernel, x = res
    back_pads = _back_pads(kernel_bwd.shape[:2], in_hw, g.shape[1:3], strides, pads)
    dx = _conv(g, kernel_bwd, (1, 1), back_pads, groups, dilation=strides)
    dk = None
    if x is not None:
        dk = jax.vjp(lambda k: _conv(x, k, strides, pads, groups), kernel)[1](g)[0]
    return dx.astype(g.dtype), dk, None


conv_with_backward_kernel.defvjp(_fwd, _bwd, symbolic_zeros=True)


def _back_pads(kernel_hw, in_hw, out_hw, strides, pads):
    # Input gradient of a strided, padded convolution: dilate g by the stride, pad it by (k-1-lo)
    # before and whatever makes the result the input's size after, convolve with the backward
    # kernel at stride 1. (A 1x1 convolution's is (0, 0): a matrix product again.)
    return [(k - 1 - lo, n + lo - (o - 1) * s - 1)
            for k, n, o, s, (lo, _) in zip(kernel_hw, in_hw, out_hw, strides, pads)]


def _onednn_conv(x, kernel, strides, pads, bias=None, relu=False, groups=1, out_dtype=jnp.float32, mask=None):
    """``_conv`` through oneDNN for a non-grouped or depthwise (``groups`` = channels) convolution:
    ``x`` is cast to the kernel's dtype (bfloat16 or float32; XLA fuses the cast into the loop that
    made ``x``), the result is ``out_dtype``; ``mask`` as in :func:`onednn.conv`."""
    return onednn.conv(x.astype(kernel.dtype), kernel, bias, strides, pads, relu=relu, groups=groups,
                       out_dtype=out_dtype, mask=mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def conv_onednn(x, kernel, kernel_fast, kernel_bwd, strides, pads, in_hw, groups=1):
    """``conv(x, kernel)`` through oneDNN with the prepared ``kernel_fast`` (``kernel`` in the
    kernel's dtype) and ``kernel_bwd`` (its backward kernel, same dtype); the result is float32.
    The input gradient is a forward oneDNN convolution of ``g`` with ``kernel_bwd``; the
    gradient with respect to ``kernel`` (never needed in a dream) is JAX's rule on XLA's conv.
    ``groups``: 1, or the channels (depthwise)."""
    return _onednn_conv(x, kernel_fast, strides, pads, groups=groups)


def _onednn_fwd(x, kernel, kernel_fast, kernel_bwd, strides, pads, in_hw, groups):
    y = _onednn_conv(x.value, kernel_fast.value, strides, pads, groups=groups)
    saved_x = x.value if kernel.perturbed else None
    return y, (kernel_fast.value, kernel_bwd.value, kernel.value if kernel.perturbed else None, saved_x)


# The ReLU mask of a oneDNN convolution's input gradient inside the call (oneDNN's ReLU backward,
# where the gradient, the ReLU's output and the kernels share a dtype: the bfloat16 hand-over
# inside an Inception branch, or float32 kernels), instead of an XLA select loop before it: 1.2-2 ms
# less per 253x253x64 bfloat16 gradient, and one XLA loop fewer to compile. False: always the
# XLA loop (A/B runs).
MASK_IN_CALL = True


def _onednn_input_grad(g, kernel_fast, kernel_bwd, strides, pads, in_hw, groups, out_dtype=jnp.float32,
                       relu_out=None):
    """The input gradient of a oneDNN convolution, in ``out_dtype``: at stride 1 a forward
    convolution of ``g`` with the backward kernel; strided, oneDNN's backward-data primitive on
    the forward kernel (the forward form would convolve a gradient dilated by the stride, 3 of 4
    taps zero at stride 2, after an XLA pad that makes it: 4x the work). ``relu_out``: the
    convolution was followed by a ReLU with this output, and ``g`` is the ReLU's output gradient;
    the call masks it itself (``g``, ``relu_out`` and the kernels of one dtype)."""
    if tuple(strides) == (1, 1):
        back = _back_pads(kernel_bwd.shape[:2], in_hw, g.shape[1:3], strides, pads)
        return _onednn_conv(g, kernel_bwd, (1, 1), back, groups=groups, out_dtype=out_dtype, mask=relu_out)
    shape = (g.shape[0], *in_hw, kernel_fast.shape[2] * groups)
    return onednn.conv_backward_data(g.astype(kernel_fast.dtype), kernel_fast, shape, strides, pads, groups,
                                     out_dtype=out_dtype, mask=relu_out)


def _onednn_bwd(strides, pads, in_hw, groups, res, g):
    kernel_fast, kernel_bwd, kernel, x = res
    # x had Conv2D's dtype, which the result (and so g) is cast back to.
    dx = _onednn_input_grad(g, kernel_fast, kernel_bwd, strides, pads, in_hw, groups).astype(g.dtype)
    dk = None
    if x is not None:
        dk = jax.vjp(lambda k: _conv(x.astype(k.dtype), k, strides, pads, groups), kernel)[1](g.astype(kernel.dtype))[0]
    return dx, dk, None, None


conv_onednn.defvjp(_onednn_fwd, _onednn_bwd, symbolic_zeros=True)


def _conv_affine_reference(x, kernel, scale, shift, strides, pads, relu):
    """What :func:`conv_affine_onednn` computes, in XLA (its rule for parameter gradients)."""
    y = lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=DN) * scale + shift
    return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def conv_affine_onednn(x, kernel, scale, shift, folded, folded_bwd, folded_shift, strides, pads, in_hw, relu,
                       out_dtype=jnp.float32):
    """``act(conv(x, kernel) * scale + shift)`` (a convolution, an inference BatchNorm and a ReLU)
    as **one** oneDNN call: the prepared ``folded`` is ``kernel * scale`` in the kernel dtype,
    ``folded_shift`` (``shift``, prepared on the host like ``folded``) is the bias, the ReLU a
    post-op; ``folded_bwd`` is the folded kernel's backward kernel. The input gradient is ``g``
    masked by the ReLU and convolved with ``folded_bwd``, again one call (which masks). ``kernel``, ``scale`` and
    ``shift`` are used only for their gradients (never needed in a dream; JAX's rules on
    :func:`_conv_affine_reference`), so a dream program computes no BatchNorm statistics at all.

    ``out_dtype`` is the result's (float32, or the kernel dtype where the activation goes
    straight into another convolution, which would round it to that anyway: see
    :func:`conv_affine`); the input gradient comes back in ``x``'s dtype."""
    return _onednn_conv(x, folded, strides, pads, bias=folded_shift, relu=relu, out_dtype=out_dtype)


def _affine_fwd(x, kernel, scale, shift, folded, folded_bwd, folded_shift, strides, pads, in_hw, relu, out_dtype):
    y = _onednn_conv(x.value, folded.value, strides, pads, bias=folded_shift.value, relu=relu, out_dtype=out_dtype)
    params = (kernel, scale, shift)
    wanted = any(p.perturbed for p in params)
    saved = (x.value, *(p.value for p in params)) if wanted else None
    # x itself is not kept (a dream never needs it); a zero-size array of its dtype says what
    # dtype its gradient must have.
    return y, (folded.value, folded_bwd.value, y if relu else None, saved, jnp.zeros((0,), x.value.dtype))


def _affine_bwd(strides, pads, in_hw, relu, out_dtype, res, g):
    folded, folded_bwd, y, saved, x_dtype = res
    in_call = relu and MASK_IN_CALL and g.dtype == y.dtype == folded.dtype  # (the call's one-dtype rule)
    gz = jnp.where(y > 0, g, jnp.zeros((), g.dtype)) if relu and not in_call else g  # (XLA fuses it with the cast)
    dx = _onednn_input_grad(gz, folded, folded_bwd, strides, pads, in_hw, 1, out_dtype=x_dtype.dtype,
                            relu_out=y if in_call else None)
    dk = ds = dt = None
    if saved is not None:
        x, kernel, scale, shift = saved
        _, vjp = jax.vjp(lambda k, a, b: _conv_affine_reference(x, k, a, b, strides, pads, relu), kernel, scale, shift)
        dk, ds, dt = vjp(g.astype(jnp.float32))
    return dx, dk, ds, dt, None, None, None


conv_affine_onednn.defvjp(_affine_fwd, _affine_bwd, symbolic_zeros=True)


def conv_affine(parent: nn.Module, conv: "Conv2D", x, affine, relu: bool = False, feeds: tuple | None = None):
    """``act(affine(conv(x)))`` for a convolution followed by an inference BatchNorm (and a ReLU),
    called from the ``parent`` module that owns both; ``affine`` is a module with an
    ``affine(channels) -> (scale, shift)`` method (:class:`~dreamjax.models.keras_apps.KerasBatchNorm`).

    Everywhere but the oneDNN dream path this is exactly ``conv``, ``affine``, ReLU, as three
    modules. When :func:`prepare_dream_variables` traces the model it also stores, in the
    parent's ``"dream"`` collection, the convolution's kernel with the BatchNorm scale folded in,
    its backward kernel and the shift (``fused_kernel``, ``fused_kernel_bwd``, ``fused_shift``);
    with oneDNN kernels the three become one oneDNN call forward (bias and ReLU as post-ops) and
    one backward, where XLA ran a convolution, a BatchNorm loop, a ReLU and a cast.

    ``feeds`` = ``((kh, kw), features, strides, padding)`` of the next convolution when the
    result goes only into that one (the next step of an Inception branch): with bfloat16 kernels,
    and that convolution large enough for oneDNN too, the result is bfloat16 — the bits that
    convolution would have rounded it to (its gradient likewise), half the bytes, no cast.
    """
    strides, pads = _geometry(conv, x)
    kh, kw = conv.kernel_size
    if (conv.feature_group_count == 1 and parent.has_variable(DREAM, "fused_kernel")
            and not parent.is_mutable_collection(DREAM)
            and _conv_flops(x.shape, (kh, kw, x.shape[-1], conv.features), strides, pads) >= ONEDNN_MIN_FLOPS):
        kernel = conv.variables["params"]["kernel"]
        scale, shift = affine.affine()
        get = functools.partial(parent.get_variable, DREAM)
        folded = get("fused_kernel")
        chain = folded.dtype == jnp.bfloat16 and _hands_over_bf16(
            feeds, (x.shape[0], *_out_hw(x.shape[1:3], (kh, kw), strides, pads), conv.features))
        x = x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)
        y = conv_affine_onednn(x, kernel, scale, shift, folded, get("fused_kernel_bwd"), get("fused_shift"),
                               strides, pads, tuple(x.shape[1:3]), bool(relu),
                               jnp.bfloat16 if chain else jnp.float32)
        return y if chain else y.astype(conv.dtype)
    y = affine(conv(x))
    if _preparing(parent) and _PREP.fuse and conv.has_variable(DREAM, "kernel_onednn"):
        # The folded kernels (float32 here; _for_kernels keeps them in the oneDNN dtype, or drops
        # them for XLA).
        scale, shift = affine.affine(xp=np)
        folded = np.asarray(conv.variables["params"]["kernel"]) * scale
        _host_variable(parent, "fused_kernel", folded)
        _host_variable(parent, "fused_kernel_bwd", backward_kernel(folded))
        _host_variable(parent, "fused_shift", shift)
    return jax.nn.relu(y) if relu else y


def _out_hw(in_hw, kernel_hw, strides, pads) -> tuple[int, int]:
    """Output height and width of a convolution (explicit pads)."""
    return tuple((n + sum(p) - k) // s + 1 for n, k, s, p in zip(in_hw, kernel_hw, strides, pads))


def _hands_over_bf16(feeds: tuple | None, y_shape) -> bool:
    """Whether an activation of ``y_shape`` that goes only into the convolution ``feeds`` =
    ``((kh, kw), features, strides, padding)`` may be handed over in bfloat16: only when that
    convolution runs on oneDNN too (large enough), which rounds its input to bfloat16 anyway; one
    that XLA runs would read it in float32, and rounding it first would change the dream."""
    if feeds is None:
        return False
    (kh, kw), features, strides, padding = feeds
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    pads = _pads(tuple(y_shape[1:3]), (kh, kw), strides, padding)
    return _conv_flops(y_shape, (kh, kw, y_shape[-1], features), strides, pads) >= ONEDNN_MIN_FLOPS


# While prepare_dream_variables traces a model (in this thread): ``recorded`` = {(module path..., name):
# NumPy value}, ``fuse`` = its fuse_batchnorm. Thread-local: a prefetch thread may trace meanwhile.
_PREP = threading.local()


def _preparing(module: nn.Module) -> bool:
    return (getattr(_PREP, "recorded", None) is not None and module.is_mutable_collection(DREAM)
            and not module.is_initializing())


def _host_variable(module: nn.Module, name: str, value: np.ndarray) -> None:
    """Declare a ``"dream"`` variable made by :func:`prepare_dream_variables`' trace: computed on
    the host with NumPy from the concrete parameters and recorded by path, so preparing compiles
    nothing (one XLA program of weight flips and casts took 4-13 s to compile for InceptionV3)."""
    _PREP.recorded[tuple(module.path) + (name,)] = value
    module.variable(DREAM, name, lambda: value)


def resolve_kernels(choice: str = "auto", platform: str | None = None, devices: int | None = None) -> str:
    """``auto|xla|onednn|onednn_f32`` -> the kernel that runs here (``xla``, ``onednn`` or ``onednn_f32``).

    ``auto`` takes oneDNN bfloat16 on a CPU backend whose CPU has bfloat16 instructions and where
    the extension builds and loads and the batch is not sharded over several devices, else XLA (one
    log line says why). Asking for ``onednn`` where it cannot run raises :class:`KernelsUnavailable`
    with the reason.
    """
    if choice not in KERNELS:
        raise ValueError(f"cpu_kernels={choice!r}: expected one of {', '.join(KERNELS)}")
    if choice == "xla":
        return "xla"
    platform = platform or jax.default_backend()
    if platform != "cpu":
        if choice != "auto":
            raise KernelsUnavailable(f"cpu_kernels={choice}: the oneDNN kernel runs on CPUs only "
                                     f"(JAX backend here: {platform})")
        return "xla"
    if devices is None:
        devices = jax.local_device_count()
    st = onednn.status()
    need_bf16 = choice in ("auto", "onednn")
    if devices > 1:
        # The custom call has no partitioning rule: a batch sharded over several (forced host)
        # devices would be gathered onto each of them.
        st = onednn.Status(False, False, f"the batch is sharded over {devices} CPU devices (one device only)")
    if st.available and (st.bf16 or not need_bf16):
        return "onednn" if choice == "auto" else choice
    why = st.reason if not st.available else "this CPU has no bfloat16 instructions (AMX / AVX512-BF16)"
    if choice != "auto":
        raise KernelsUnavailable(f"cpu_kernels={choice} cannot run here: {why}. Use cpu_kernels=xla or auto "
                                 "(oneDNN needs `pip install dreamjax[onednn]`, a C++ compiler and an x86 CPU)")
    if not _told_fallback:
        log.warning("oneDNN kernels unavailable, XLA convolutions run instead: %s", why)
        _told_fallback.append(why)
    return "xla"


# Below this many FLOPs per call a convolution stays on XLA even with oneDNN kernels: a oneDNN call
# costs ~45 us on top (SYCL queue round trip, weight reorder), and AMX tiles waste most of their
# width on few channels. Measured under load on the 2-core CPU (1x1 convolutions at Lite0 shapes):
# 15-22 MFLOP ran 0.5x XLA's speed, 30 MFLOP level, 40 MFLOP 2.8-3.9x; 3x3 at >= 230 MFLOP 3.9-5.6x.
ONEDNN_MIN_FLOPS = 25e6


def _conv_flops(x_shape, kernel_shape, strides, pads) -> float:
    kh, kw, ci, o = kernel_shape
    ho, wo = _out_hw(x_shape[1:3], (kh, kw), strides, pads)
    return 2.0 * x_shape[0] * ho * wo * kh * kw * ci * o


class KernelsUnavailable(RuntimeError):
    """``onednn`` kernels were asked for where they cannot run (the message says why)."""


_told_fallback: list = []


class Conv2D(nn.Module):
    """``nn.Conv`` without bias (parameter ``kernel``, HWIO), plus the dream fast path.

    With a ``"dream"`` collection holding ``kernel_bwd`` the input gradient is a forward
    convolution with it (see the module docstring); :func:`prepare_dream_variables` makes it.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    feature_group_count: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        cin, groups = x.shape[-1], self.feature_group_count
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, cin // groups, self.features),
                            jnp.float32)
        strides, pads = _geometry(self, x)
        x = x.astype(self.dtype)
        k = kernel.astype(self.dtype)
        if _preparing(self) and supports_backward_kernel(kernel.shape, groups):
            host = np.asarray(kernel)
            _host_variable(self, "kernel_bwd", backward_kernel(host, groups))
            if groups == 1:  # marks the convolutions oneDNN may run; kept or dropped by prepare_dream_variables
                _host_variable(self, "kernel_onednn", host)
            else:  # depthwise: oneDNN in float32 whatever the kernels' dtype (module docstring)
                _host_variable(self, "kernel_dw_onednn", host)
        if (self.has_variable(DREAM, "kernel_onednn") and not self.is_mutable_collection(DREAM)
                and _conv_flops(x.shape, kernel.shape, strides, pads) >= ONEDNN_MIN_FLOPS):
            kf, kb = self.get_variable(DREAM, "kernel_onednn"), self.get_variable(DREAM, "kernel_bwd_onednn")
            return conv_onednn(x, kernel, kf, kb, strides, pads, tuple(x.shape[1:3])).astype(self.dtype)
        if self.has_variable(DREAM, "kernel_dw_onednn") and not self.is_mutable_collection(DREAM):
            kf, kb = self.get_variable(DREAM, "kernel_dw_onednn"), self.get_variable(DREAM, "kernel_bwd")
            return conv_onednn(x, kernel, kf, kb, strides, pads, tuple(x.shape[1:3]), groups).astype(self.dtype)
        if not self.has_variable(DREAM, "kernel_bwd"):
            return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=DN, feature_group_count=groups)
        kb = self.get_variable(DREAM, "kernel_bwd").astype(self.dtype)
        return conv_with_backward_kernel(x, k, kb, strides, pads, groups, tuple(x.shape[1:3]))


def prepare_dream_variables(module: nn.Module, variables, sample_shape, kernels: str = "xla",
                            fuse_batchnorm: bool = True) -> dict:
    """``variables`` plus the ``"dream"`` collection of backward kernels for ``module``.

    Traces the module once on zeros of ``sample_shape`` (the smallest valid input) so that every
    :class:`Conv2D` adds its own backward kernel; the result is ordinary arrays, made once per
    backbone and reused by every compiled dream program. ``kernels`` (``xla``, ``onednn`` or
    ``onednn_f32``, see :func:`resolve_kernels`) picks who runs the non-grouped convolutions:
    for oneDNN their forward and backward kernels are stored in its dtype (bfloat16 or float32),
    and a convolution followed by a BatchNorm (and ReLU) through :func:`conv_affine` gets its
    BatchNorm folded in (one oneDNN call; ``fuse_batchnorm=False`` keeps three ops, for A/B runs).
    """
    if kernels not in ("xla", "onednn", "onednn_f32"):
        raise ValueError(f"kernels={kernels!r}: expected xla, onednn or onednn_f32 (resolve 'auto' first)")
    plain = {k: v for k, v in variables.items() if k != DREAM}
    dtype = jnp.bfloat16 if kernels == "onednn" else jnp.float32

    # Traced (never compiled or run) on an abstract input: the modules declare their dream
    # variables, computed on the host from the concrete parameters (_host_variable).
    _PREP.recorded, _PREP.fuse = {}, bool(fuse_batchnorm)
    try:
        jax.eval_shape(lambda x: module.apply(plain, x, mutable=[DREAM]),
                       jax.ShapeDtypeStruct(tuple(sample_shape), jnp.float32))
        recorded = _PREP.recorded
    finally:
        _PREP.recorded = None
    tree: dict = {}
    for path, value in recorded.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    added = jax.device_put(_for_kernels(tree, kernels, dtype))  # (jnp.asarray would compile per shape)
    return {**plain, DREAM: added} if added else plain


def _for_kernels(tree: dict, kernels: str, dtype) -> dict:
    """The prepared collection with each oneDNN-capable convolution's kernels in ``dtype``
    (``kernel_onednn`` dropped for ``xla``)."""
    tree = dict(tree)
    fused = "fused_kernel" in tree
    if fused and kernels == "xla":
        for k in ("fused_kernel", "fused_kernel_bwd", "fused_shift"):
            del tree[k]
    elif fused:
        tree["fused_kernel"] = tree["fused_kernel"].astype(dtype)
        tree["fused_kernel_bwd"] = tree["fused_kernel_bwd"].astype(dtype)
    if "kernel_dw_onednn" in tree and kernels == "xla":
        del tree["kernel_dw_onednn"]
    if "kernel_onednn" in tree:
        if kernels == "xla":
            del tree["kernel_onednn"]
        else:
            tree["kernel_onednn"] = tree["kernel_onednn"].astype(dtype)
            # kernel_bwd stays float32 for the convolutions too small for oneDNN (XLA runs them)
            tree["kernel_bwd_onednn"] = tree["kernel_bwd"].astype(dtype)
    tree = {k: _for_kernels(v, kernels, dtype) if isinstance(v, dict) else v for k, v in tree.items()}
    if fused and kernels != "xla":
        # The folded kernels replace the convolution's own oneDNN copies (its float32 kernel_bwd
        # stays, for the sizes where the convolution is too small for oneDNN and XLA runs it).
        for child in tree.values():
            if isinstance(child, dict):
                child.pop("kernel_onednn", None)
                child.pop("kernel_bwd_onednn", None)
    return tree


def on_onednn(module: nn.Module) -> bool:
    """Whether the dream variables under ``module`` (bound, inside ``apply``) pick oneDNN kernels."""
    return not module.is_mutable_collection(DREAM) and dream_kernels(module.variables) != "xla"


def dream_kernels(variables) -> str:
    """Which kernel the dream variables select: ``xla``, ``onednn`` (bfloat16) or ``onednn_f32``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get(DREAM, {})):
        if getattr(path[-1], "key", None) in ("kernel_onednn", "fused_kernel"):
            return "onednn" if leaf.dtype == jnp.bfloat16 else "onednn_f32"
    return "xla"


def _max_and_argmax(x, window, stride):
    out, arg = None, None
    for k, s in enumerate(_window_slices(x, (window, window), (stride, stride))):
        if out is None:
            out, arg = s, jnp.zeros(s.shape, jnp.int8)
        else:
            take = s > out  # strictly greater: the first maximum in row-major order wins
            out, arg = jnp.where(take, s, out), jnp.where(take, jnp.int8(k), arg)
    return out, arg


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int = 3, stride: int = 2, as_call: bool = False):
    """``VALID`` max pool as a running maximum over strided slices (one fused loop).

    The first maximum in row-major window order wins ties, as ``reduce_window``'s gradient
    (``select_and_scatter`` with ``>=``) does, so forward values and gradients are identical.
    The backward pass keeps only the winner's index (int8) and spreads ``g`` back with one
    strided pad per window position; with ``as_call`` (the oneDNN dream path, float32) it is one
    call of the kernels' extension instead, the same bits: XLA fuses the whole computation of
    ``g`` (and the argmax) into each of the pads, recomputing it 9 times (55 ms of a 240 ms
    InceptionV3 step at 512 px; 5 ms as a call).
    """
    return _max_and_argmax(x, window, stride)[0]


def _max_fwd(x, window, stride, as_call):
    out, arg = _max_and_argmax(x, window, stride)
    return out, (arg, x.shape)


def _max_bwd(window, stride, as_call, res, g):
    arg, shape = res
    if as_call and g.dtype == jnp.float32:
        return (onednn.max_pool_backward(g, arg, shape, window, stride),)
    h, w = shape[1:3]
    ho, wo = g.shape[1:3]
    dx = None
    for k in range(window * window):
        i, j = divmod(k, window)
        part = jnp.where(arg == k, g, jnp.zeros((), g.dtype))
        part = lax.pad(part, jnp.zeros((), g.dtype),
                       ((0, 0, 0), (i, h - i - (ho - 1) * stride - 1, stride - 1),
                        (j, w - j - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
        dx = part if dx is None else dx + part
    return (dx,)


max_pool.defvjp(_max_fwd, _max_bwd)


@functools.lru_cache(maxsize=64)
def _window_counts(h: int, w: int, window: int) -> np.ndarray:
    r = window // 2
    rows = np.array([min(i + r, h - 1) - max(i - r, 0) + 1 for i in range(h)], np.float32)
    cols = np.array([min(j + r, w - 1) - max(j - r, 0) + 1 for j in range(w)], np.float32)
    return (rows[:, None] * cols[None, :])[None, :, :, None]


def _box_sum(x, window: int):
    """Sum over each position's ``window`` x ``window`` neighbourhood, zero padding (``SAME``),
    added in ``reduce_window``'s row-major order from 0: one pad, one fused loop."""
    r = window // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    total = jnp.zeros_like(x)
    for s in _window_slices(xp, (window, window), (1, 1)):
        total = total + s
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def avg_pool_same(x, window: int = 3):
    """Stride-1 ``SAME`` average pool that excludes the padding from the mean (Keras'
    ``AveragePooling2D(padding="same")``): a box sum divided by each position's count of real
    pixels. The box sum's transpose is the same box sum (the window is symmetric), so the
    backward pass is one box sum of ``g / counts`` instead of nine padded copies of ``g``."""
    return _box_sum(x, window) / jnp.asarray(_window_counts(*x.shape[1:3], window), x.dtype)


def _avg_fwd(x, window):
    return avg_pool_same(x, window), None


def _avg_bwd(window, _, g):
    h, w = g.shape[1:3]
    return (_box_sum(g / jnp.asarray(_window_counts(h, w, window), g.dtype), window),)




avg_pool_same.defvjp(_avg_fwd, _avg_bwd)
