"""oneDNN convolutions for the dream path on CPUs, as an XLA FFI custom call.

XLA:CPU (jaxlib 0.10.2) runs a bfloat16 convolution no faster than a float32 one: none of its
convolution libraries (YNNPACK, XNNPACK, its oneDNN flags) take the AMX / AVX512-BF16 path
(``results/bench/README.md``). oneDNN does (5.6x on a 3x3 convolution at 64x64x192 measured
through PyTorch), so :func:`conv` calls it directly from inside the compiled program
(:func:`conv_backward_data` for strided input gradients; either masks a gradient by a ReLU in
the same call). The same extension holds
:func:`max_pool_backward`, plain C++: the max-pool input gradient as one call, where XLA's pad
form recomputed the gradient's whole producer once per window position.

The extension (``onednn_conv.cc`` beside this file) is compiled **on first use** into
``$DREAMJAX_HOME/kernels`` (``~/.cache/dreamjax/kernels``), named by a hash of its source, the
jaxlib version (whose FFI headers it is built against) and the oneDNN version, under a file lock,
then renamed into place atomically. First use rather than install: oneDNN is an optional
dependency (``pip install dreamjax[onednn]``: the ``onednn`` and ``onednn-devel`` wheels), the
build must follow the jaxlib that is actually installed (its headers, its ABI), and an editable
or pure-Python install has no build step to hang it on. It takes ~20 s once, on one core.

Nothing here is required: :func:`status` says whether the kernel can run here, and why not
(no oneDNN wheel, no compiler, a failed build, no CPU engine, no bfloat16 instructions); the
models then use XLA's own convolutions, as before.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.weights.store import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGET = "dreamjax_onednn_conv"
MAXPOOL_BWD = "dreamjax_maxpool_bwd"
DISABLE_ENV = "DREAMJAX_ONEDNN"  # "0": behave as if the extension were absent (tests, A/B runs)


@dataclasses.dataclass(frozen=True)
class Status:
    available: bool  # the custom call is registered and runs here
    bf16: bool  # ... and the CPU has bfloat16 instructions (AMX or AVX512-BF16)
    reason: str  # why not, or where the library was loaded from
    library: str = ""


_status: Status | None = None


def _onednn_paths() -> tuple[Path, Path, str]:
    """(include dir, libdnnl.so, version) from the installed ``onednn`` / ``onednn-devel`` wheels."""
    version = metadata.version("onednn")
    lib = inc = None
    for f in metadata.files("onednn") or ():
        if f.name.startswith("libdnnl.so"):
            lib = Path(f.locate()).resolve()
            break
    for f in metadata.files("onednn-devel") or ():
        if str(f).endswith("oneapi/dnnl/dnnl.hpp"):
            inc = Path(f.locate()).resolve().parents[2]
            break
    if lib is None or inc is None:
        raise FileNotFoundError("the onednn / onednn-devel wheels list no libdnnl.so or oneapi/dnnl/dnnl.hpp")
    return inc, lib, version


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    return cxx


def library_path() -> Path:
    """Where the built extension lives (built or not); the name is the build's identity."""
    inc, lib, version = _onednn_paths()
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"jaxlib={metadata.version('jaxlib')} onednn={version} lib={lib}".encode())
    return cache_dir() / "kernels" / f"onednn_conv-{h.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compile the extension into the cache folder (once; concurrent callers wait on a lock)."""
    out = library_path()
    if out.exists() and not force:
        return out
    inc, lib, _ = _onednn_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists() and not force:  # another process built it while we waited
            return out
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", tmp,
               f"-I{inc}", f"-I{jax.ffi.include_dir()}", f"-L{lib.parent}", f"-l:{lib.name}",
               # DT_RPATH (not RUNPATH) so libdnnl's own dependencies (tbb, sycl, ...) are found
               # in the wheel's folder too.
               f"-Wl,-rpath,{lib.parent}", "-Wl,--disable-new-dtags"]
        log.info("building the oneDNN convolution kernel: %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _load() -> Status:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return Status(False, False, f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}")
    try:
        path = build()
        _, lib, _ = _onednn_paths()
    except (metadata.PackageNotFoundError, FileNotFoundError, RuntimeError, OSError) as e:
        return Status(False, False, f"oneDNN kernel not built: {e}")
    # The PyPI oneDNN is built with the SYCL runtime; its CPU engine is a SYCL CPU device, found
    # through the OpenCL CPU runtime that the wheel brings along (not registered system-wide).
    icd = lib.parent / "libintelocl.so"
    if icd.exists() and "OCL_ICD_FILENAMES" not in os.environ:
        os.environ["OCL_ICD_FILENAMES"] = str(icd)
    try:
        so = ctypes.CDLL(str(path))
        probe = so.dreamjax_onednn_probe()
    except OSError as e:
        return Status(False, False, f"oneDNN kernel could not be loaded: {e}", str(path))
    if probe == 2:
        return Status(False, False, "oneDNN found no CPU engine (SYCL CPU device missing)", str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(so.DreamjaxOnednnConv), platform="cpu")
    jax.ffi.register_ffi_target(MAXPOOL_BWD, jax.ffi.pycapsule(so.DreamjaxMaxPoolBwd), platform="cpu")
    bf16 = probe == 0
    return Status(True, bf16, f"oneDNN {metadata.version('onednn')} from {lib.parent}"
                  + ("" if bf16 else " (this CPU has no bfloat16 instructions: float32 only)"), str(path))


def status() -> Status:
    """Whether the oneDNN kernel runs here (built, loaded and registered on the first call)."""
    global _status
    if _status is None:
        _status = _load()
        if _status.available:
            log.info("oneDNN convolution kernel ready: %s", _status.reason)
        else:
            log.info("oneDNN convolution kernel unavailable, XLA convolutions will run: %s", _status.reason)
    return _status


def conv(x, kernel, bias=None, strides=(1, 1), pads=((0, 0), (0, 0)), relu: bool = False, groups: int = 1,
         out_dtype=jnp.float32, mask=None):
    """``act(conv(x, kernel) + bias)`` through oneDNN: NHWC ``x``, HWIO ``kernel``, both bfloat16
    (f32 accumulation) or both float32; the result is ``out_dtype`` (float32 or bfloat16). ``pads``
    are explicit ((top, bottom), (left, right)); ``groups`` as ``feature_group_count`` (1, or the
    channels: depthwise). ``mask`` (``x``'s shape and dtype): convolve ``where(mask > 0, x, 0)``
    instead, masked inside the call (oneDNN's ReLU backward): a gradient through a ReLU whose
    output is ``mask``. Raises
    ``RuntimeError`` (with :func:`status`'s reason) where the kernel cannot run."""
    n, h, w, c = x.shape
    kh, kw, ci, o = kernel.shape
    assert ci * groups == c and o % groups == 0 and x.dtype == kernel.dtype, (x.shape, x.dtype, kernel.shape,
                                                                              kernel.dtype, groups)
    (pt, pb), (pl, pr) = pads
    ho = (h + pt + pb - kh) // strides[0] + 1
    wo = (w + pl + pr - kw) // strides[1] + 1
    b = jnp.zeros((o,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    return _call(x, kernel, b, (n, ho, wo, o), out_dtype, strides, pads, bias is not None, relu, groups, False,
                 mask)


def conv_backward_data(g, kernel, in_shape, strides=(1, 1), pads=((0, 0), (0, 0)), groups: int = 1,
                       out_dtype=jnp.float32, mask=None):
    """The input gradient of :func:`conv` (without bias or ReLU) at ``g`` (the output's gradient,
    NHWC), from the forward ``kernel`` (HWIO, ``g``'s dtype) and the forward geometry: oneDNN's
    backward-data primitive, which takes strides as they are (no dilated gradient, no zero taps).
    ``in_shape`` is the forward input's (N, H, W, C); the result is ``out_dtype``. ``mask`` as in
    :func:`conv`."""
    kh, kw, ci, o = kernel.shape
    assert g.shape[-1] == o and ci * groups == in_shape[-1] and g.dtype == kernel.dtype, (g.shape, g.dtype,
                                                                                          kernel.shape, in_shape)
    b = jnp.zeros((o,), jnp.float32)
    return _call(g, kernel, b, tuple(in_shape), out_dtype, strides, pads, False, False, groups, True, mask)


def max_pool_backward(g, arg, in_shape, window: int, stride: int):
    """The input gradient (float32, shape ``in_shape``) of a ``VALID`` max pool from its output
    gradient ``g`` (float32) and the winners' window positions ``arg`` (int8, row-major in the
    window), as :func:`dreamjax.models.ops.max_pool` records them; the same bits as its XLA form."""
    st = status()
    if not st.available:
        raise RuntimeError(f"the oneDNN kernels cannot run here: {st.reason}")
    call = jax.ffi.ffi_call(MAXPOOL_BWD, jax.ShapeDtypeStruct(tuple(in_shape), g.dtype))
    return call(g, arg.astype(jnp.int8), window=np.int64(window), stride=np.int64(stride))


def _call(x, kernel, b, out_shape, out_dtype, strides, pads, has_bias, relu, groups, backward_data, mask=None):
    st = status()
    if not st.available:
        raise RuntimeError(f"the oneDNN convolution kernel cannot run here: {st.reason}")
    if mask is not None:
        assert mask.shape == x.shape and mask.dtype == x.dtype, (x.shape, x.dtype, mask.shape, mask.dtype)
    (pt, pb), (pl, pr) = pads
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, out_dtype))
    m = jnp.zeros((0,), jnp.float32) if mask is None else mask  # (no mask: an empty operand)
    return call(x, kernel, b, m, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr),
                has_bias=bool(has_bias), relu=bool(relu), groups=np.int64(groups), backward_data=bool(backward_data),
                masked=mask is not None)


def cached_weights() -> int:
    """How many reordered weight copies (cached by content) the kernel holds; 0 when not loaded."""
    s = status()
    return ctypes.CDLL(s.library).dreamjax_onednn_cached_weights() if s.available else 0


def cached_primitives() -> int:
    """How many oneDNN primitives (one per shape) the kernel holds; 0 when not loaded."""
    s = status()
    return ctypes.CDLL(s.library).dreamjax_onednn_cached_primitives() if s.available else 0
