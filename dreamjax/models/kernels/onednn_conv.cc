// Convolutions and 1x1 matrix products through oneDNN, as an XLA FFI custom call.
//
// One handler, `dreamjax_onednn_conv`: y[N,Ho,Wo,O] = act(conv(x[N,H,W,C], w[kh,kw,C/G,O]) + b)
// with x and w both bfloat16 (AMX / AVX512-BF16, f32 accumulation) or both float32, y float32 or
// bfloat16, in G groups
// (dreamjax uses G = 1 and G = C = O, EfficientNet's depthwise convolutions; for G > 1 the HWIO
// kernel is oneDNN's `hwigo` layout, output channel g*(O/G)+o belonging to group g). NHWC and
// HWIO are XLA's own layouts, so nothing is transposed on the JAX side; oneDNN wants the weights
// in its blocked layout, and the reordered copies are cached by *content* (a 64-bit hash of the
// weight bytes, their size and the target layout: the weights are arguments of the dream
// programs, so their address alone is no safe key; hashing reads them once, a reorder reads and
// scatters them). A 1x1, stride-1, unpadded convolution runs as a
// oneDNN matmul [N*H*W, C] x [C, O]. With `backward_data` the call is the input gradient of that
// convolution instead: x is the output's gradient [N,Ho,Wo,O], y the input's [N,H,W,C], w the
// forward weights (oneDNN's backward-data primitive: strides without dilating the gradient).
// With `masked`, x (a gradient, either direction) is first masked by a ReLU, t = m > 0 ? x : 0
// with m that ReLU's output (x's shape and dtype), by oneDNN's ReLU backward primitive, into a
// scratch buffer the convolution then reads: what XLA's select loop before the call did (oneDNN
// has no mixed-dtype form of it, so x, m and w share one dtype). Primitives are cached per shape; each call gets its own
// thread-local stream and scratch buffers, because XLA:CPU may run independent branches (an
// Inception block's towers) concurrently.
//
// Built by dreamjax/models/kernels/__init__.py into the cache folder on first use.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& thread_stream() {
  thread_local dnnl::stream s(cpu_engine());
  return s;
}

struct Entry {
  dnnl::primitive prim;
  memory::desc src_md, w_md, user_w_md, bias_md, dst_md;
  bool reorder_w = false;
  dnnl::reorder w_reorder;
  std::string w_layout;  // layout_key(w_md), made once: part of every cached weight copy's key
  size_t scratch_bytes = 0;
  // The ReLU mask (Problem::mask): oneDNN's ReLU backward from its output, on src_md (x, m and
  // the masked copy share it), x -> the convolution's input.
  dnnl::primitive mask_prim;
  size_t mask_scratch_bytes = 0;
};

std::mutex cache_mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

struct Problem {
  // The forward convolution's geometry: input [n,h,w,c], output [n,ho,wo,o]. For the backward-data
  // direction (bwd) the call's input is the output's gradient and its result the input's.
  int64_t n, h, w, c, kh, kw, o, ho, wo;
  int64_t sh, sw, pt, pb, pl, pr;
  bool bf16, bias, relu;
  int64_t g;
  bool out_bf16, bwd;
  bool mask = false;  // x masked by a ReLU's output m first
  bool pointwise() const {
    return !bwd && g == 1 && kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pb == 0 && pl == 0 && pr == 0;
  }
  std::string key() const {  // the raw fields (one per call: no stream formatting)
    const int64_t v[] = {n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr, bf16, bias, relu, g, out_bf16, bwd, mask};
    return std::string(reinterpret_cast<const char*>(v), sizeof(v));
  }
};

std::string layout_key(const memory::desc& d) {
  std::ostringstream k;
  k << static_cast<int>(d.get_data_type()) << '|';
  for (auto v : d.get_dims()) k << v << ',';
  k << '|';
  for (auto v : d.get_strides()) k << v << ',';
  k << '|';
  for (auto v : d.get_inner_blks()) k << v << ',';
  k << '|';
  for (auto v : d.get_inner_idxs()) k << v << ',';
  return k.str();
}

dnnl::primitive_attr make_attr(const Problem& p) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (p.relu) {
    dnnl::post_ops ops;
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(ops);
  }
  return attr;
}

std::shared_ptr<Entry> build(const Problem& p) {
  auto& eng = cpu_engine();
  auto e = std::make_shared<Entry>();
  dt in = p.bf16 ? dt::bf16 : dt::f32;
  dt out = p.out_bf16 ? dt::bf16 : dt::f32;
  auto attr = make_attr(p);
  if (p.pointwise()) {
    int64_t m = p.n * p.h * p.w;
    e->src_md = memory::desc({m, p.c}, in, tag::ab);
    e->user_w_md = memory::desc({p.c, p.o}, in, tag::ab);
    e->bias_md = memory::desc({1, p.o}, dt::f32, tag::ab);
    e->dst_md = memory::desc({m, p.o}, out, tag::ab);
    auto any_w = memory::desc({p.c, p.o}, in, tag::any);
    auto pd = p.bias ? dnnl::matmul::primitive_desc(eng, e->src_md, any_w, e->bias_md, e->dst_md, attr)
                     : dnnl::matmul::primitive_desc(eng, e->src_md, any_w, e->dst_md, attr);
    e->w_md = pd.weights_desc();
    e->scratch_bytes = pd.scratchpad_desc().get_size();
    e->prim = dnnl::matmul(pd);
  } else {
    memory::dims wdims = p.g == 1 ? memory::dims{p.o, p.c, p.kh, p.kw}
                                  : memory::dims{p.g, p.o / p.g, p.c / p.g, p.kh, p.kw};
    e->user_w_md = memory::desc(wdims, in, p.g == 1 ? tag::hwio : tag::hwigo);
    e->bias_md = memory::desc({p.o}, dt::f32, tag::a);
    auto any_w = memory::desc(wdims, in, tag::any);
    memory::dims strides{p.sh, p.sw}, pad_l{p.pt, p.pl}, pad_r{p.pb, p.pr};
    auto algo = dnnl::algorithm::convolution_direct;
    if (p.bwd) {
      // The input gradient of the forward convolution, from its own (forward) weights: oneDNN's
      // backward-data primitive handles strides itself, where a forward convolution with the
      // backward kernel would need the gradient dilated by the stride (zeros in 3 of 4 taps).
      // src_md holds the call's input (the output's gradient), dst_md its result.
      e->src_md = memory::desc({p.n, p.o, p.ho, p.wo}, in, tag::nhwc);
      e->dst_md = memory::desc({p.n, p.c, p.h, p.w}, out, tag::nhwc);
      auto hint = dnnl::convolution_forward::primitive_desc(  // (in the weights' dtype throughout)
          eng, dnnl::prop_kind::forward_training, algo, memory::desc({p.n, p.c, p.h, p.w}, in, tag::nhwc), any_w,
          memory::desc({p.n, p.o, p.ho, p.wo}, in, tag::nhwc), strides, pad_l, pad_r);
      auto pd = dnnl::convolution_backward_data::primitive_desc(eng, algo, e->dst_md, any_w, e->src_md, strides,
                                                                pad_l, pad_r, hint, attr);
      e->w_md = pd.weights_desc();
      e->scratch_bytes = pd.scratchpad_desc().get_size();
      e->prim = dnnl::convolution_backward_data(pd);
    } else {
      e->src_md = memory::desc({p.n, p.c, p.h, p.w}, in, tag::nhwc);
      e->dst_md = memory::desc({p.n, p.o, p.ho, p.wo}, out, tag::nhwc);
      auto kind = dnnl::prop_kind::forward_inference;
      auto pd = p.bias ? dnnl::convolution_forward::primitive_desc(eng, kind, algo, e->src_md, any_w, e->bias_md,
                                                                   e->dst_md, strides, pad_l, pad_r, attr)
                       : dnnl::convolution_forward::primitive_desc(eng, kind, algo, e->src_md, any_w, e->dst_md,
                                                                   strides, pad_l, pad_r, attr);
      e->w_md = pd.weights_desc();
      e->scratch_bytes = pd.scratchpad_desc().get_size();
      e->prim = dnnl::convolution_forward(pd);
    }
  }
  if (p.mask) {
    dnnl::primitive_attr mattr;
    mattr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto algo = dnnl::algorithm::eltwise_relu_use_dst_for_bwd;
    auto hint = dnnl::eltwise_forward::primitive_desc(eng, dnnl::prop_kind::forward_training, algo, e->src_md,
                                                      e->src_md, 0.f, 0.f);
    auto pd = dnnl::eltwise_backward::primitive_desc(eng, algo, e->src_md, e->src_md, e->src_md, 0.f, 0.f, hint,
                                                     mattr);
    e->mask_scratch_bytes = pd.scratchpad_desc().get_size();
    e->mask_prim = dnnl::eltwise_backward(pd);
  }
  e->reorder_w = e->w_md != e->user_w_md;
  if (e->reorder_w) e->w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, e->user_w_md, eng, e->w_md));
  e->w_layout = layout_key(e->w_md);
  return e;
}

std::shared_ptr<Entry> get(const Problem& p) {
  std::string k = p.key();
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  auto e = build(p);  // outside the lock: building a primitive JIT-compiles its kernel
  std::lock_guard<std::mutex> lock(cache_mu);
  return cache.emplace(k, e).first->second;
}

// --- reordered weights, cached by content --------------------------------------------------
uint64_t content_hash(const void* data, size_t bytes) {
  // Four independent multiply-xorshift lanes over 8-byte words (a few GB/s per core), folded.
  const auto* p = static_cast<const unsigned char*>(data);
  const uint64_t k = 0x9E3779B97F4A7C15ull;
  uint64_t h[4] = {k, k ^ 0x632BE59BD9B4E019ull, k ^ 0x85EBCA77C2B2AE63ull, k ^ 0xC2B2AE3D27D4EB4Full};
  size_t i = 0;
  for (; i + 32 <= bytes; i += 32) {
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      h[l] = (h[l] ^ w) * 0xFF51AFD7ED558CCDull;
      h[l] ^= h[l] >> 32;
    }
  }
  uint64_t tail = 0;
  for (size_t j = 0; i < bytes; ++i, ++j) tail ^= uint64_t(p[i]) << (8 * (j % 8));
  uint64_t out = bytes * k ^ tail;
  for (int l = 0; l < 4; ++l) out = (out ^ h[l]) * 0xC4CEB9FE1A85EC53ull, out ^= out >> 29;
  return out;
}


struct Reordered {
  std::vector<char> bytes;
  void* data() {
    auto a = reinterpret_cast<std::uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((a + 63) & ~std::uintptr_t(63));
  }
};

std::mutex weights_mu;
std::unordered_map<std::string, std::shared_ptr<Reordered>> weights_cache;
size_t weights_cache_bytes = 0;
const size_t kWeightsCacheLimit = size_t(2) << 30;  // 2 GiB of reordered weights, then start again

std::shared_ptr<Reordered> reordered_weights(const std::shared_ptr<Entry>& e, memory& user_w, dnnl::stream& s) {
  size_t n = e->user_w_md.get_size();
  std::string key = std::to_string(content_hash(user_w.get_data_handle(), n)) + '/' + std::to_string(n) + '/' +
                    e->w_layout;
  {
    std::lock_guard<std::mutex> lock(weights_mu);
    auto it = weights_cache.find(key);
    if (it != weights_cache.end()) return it->second;
  }
  auto r = std::make_shared<Reordered>();
  r->bytes.resize(e->w_md.get_size() + 64);
  memory wts(e->w_md, cpu_engine(), r->data());
  e->w_reorder.execute(s, user_w, wts);
  s.wait();
  std::lock_guard<std::mutex> lock(weights_mu);
  if (weights_cache_bytes + r->bytes.size() > kWeightsCacheLimit) {
    weights_cache.clear();  // entries in use stay alive through their shared_ptr
    weights_cache_bytes = 0;
  }
  auto ins = weights_cache.emplace(key, r);
  if (ins.second) weights_cache_bytes += r->bytes.size();
  return ins.first->second;
}

void* thread_buffer(int which, size_t bytes) {
  thread_local std::vector<char> bufs[3];  // reordered weights, scratchpads, the masked input
  auto& b = bufs[which];
  if (b.size() < bytes + 64) b.resize(bytes + 64);
  auto addr = reinterpret_cast<std::uintptr_t>(b.data());
  return reinterpret_cast<void*>((addr + 63) & ~std::uintptr_t(63));
}

ffi::Error Conv(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b, ffi::AnyBuffer m,
                ffi::Result<ffi::AnyBuffer> y, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                int64_t pad_bottom, int64_t pad_left, int64_t pad_right, bool has_bias, bool relu, int64_t groups,
                bool backward_data, bool masked) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("dreamjax_onednn_conv: x, w and y must be 4-d (NHWC, HWIO, NHWC)");
  if (x.element_type() != w.element_type() ||
      (x.element_type() != ffi::DataType::BF16 && x.element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("dreamjax_onednn_conv: x and w must both be bfloat16 or both float32");
  if (masked && (m.element_type() != x.element_type() || m.element_count() != x.element_count()))
    return ffi::Error::InvalidArgument("dreamjax_onednn_conv: the mask m must have x's dtype and size");
  if (y->element_type() != ffi::DataType::BF16 && y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("dreamjax_onednn_conv: y must be bfloat16 or float32");
  if (backward_data && (has_bias || relu))
    return ffi::Error::InvalidArgument("dreamjax_onednn_conv: the backward-data direction takes no bias or ReLU");
  // The forward geometry: input [n,h,w,c] -> output [n,ho,wo,o]; backward data swaps x and y.
  auto in = backward_data ? yd : xd, outd = backward_data ? xd : yd;
  Problem p{in[0], in[1], in[2], in[3], wd[0], wd[1], wd[3], outd[1], outd[2], stride_h, stride_w,
            pad_top, pad_bottom, pad_left, pad_right, x.element_type() == ffi::DataType::BF16, has_bias, relu,
            groups, y->element_type() == ffi::DataType::BF16, backward_data, masked};
  if (groups < 1 || p.c % groups != 0 || p.o % groups != 0 || wd[2] * groups != p.c || outd[0] != p.n ||
      outd[3] != p.o)
    return ffi::Error::InvalidArgument("dreamjax_onednn_conv: shapes of x, w and y do not agree");
  try {
    auto e = get(p);
    auto& eng = cpu_engine();
    auto& s = thread_stream();
    // One scratchpad for both primitives, sized once: they run one after the other on this
    // thread's in-order stream, and growing the buffer between the two would free it under the first.
    size_t scratch_bytes = std::max(e->scratch_bytes, e->mask_scratch_bytes);
    void* scratch = scratch_bytes ? thread_buffer(1, scratch_bytes) : nullptr;
    auto scratchpad = [&](size_t bytes) {
      return memory(memory::desc({static_cast<int64_t>(bytes)}, dt::u8, tag::a), eng, scratch);
    };
    void* x_data = x.untyped_data();
    if (masked) {  // the masked gradient in its own buffer (x is XLA's, read-only)
      x_data = thread_buffer(2, e->src_md.get_size());
      std::unordered_map<int, memory> margs{{DNNL_ARG_DIFF_DST, memory(e->src_md, eng, x.untyped_data())},
                                            {DNNL_ARG_DST, memory(e->src_md, eng, m.untyped_data())},
                                            {DNNL_ARG_DIFF_SRC, memory(e->src_md, eng, x_data)}};
      if (e->mask_scratch_bytes) margs.emplace(DNNL_ARG_SCRATCHPAD, scratchpad(e->mask_scratch_bytes));
      e->mask_prim.execute(s, margs);
    }
    memory src(e->src_md, eng, x_data);
    memory dst(e->dst_md, eng, y->untyped_data());
    memory user_w(e->user_w_md, eng, w.untyped_data());
    memory wts = user_w;
    std::shared_ptr<Reordered> held;  // keeps the cached copy alive while this call uses it
    static const bool cache_weights = [] {  // DREAMJAX_ONEDNN_WEIGHT_CACHE=0: reorder on every call (A/B runs)
      const char* v = std::getenv("DREAMJAX_ONEDNN_WEIGHT_CACHE");
      return !(v && std::string(v) == "0");
    }();
    if (e->reorder_w && cache_weights) {
      held = reordered_weights(e, user_w, s);
      wts = memory(e->w_md, eng, held->data());
    } else if (e->reorder_w) {
      wts = memory(e->w_md, eng, thread_buffer(0, e->w_md.get_size()));
      e->w_reorder.execute(s, user_w, wts);
    }
    std::unordered_map<int, memory> args{{DNNL_ARG_WEIGHTS, wts}};
    args.emplace(backward_data ? DNNL_ARG_DIFF_DST : DNNL_ARG_SRC, src);
    args.emplace(backward_data ? DNNL_ARG_DIFF_SRC : DNNL_ARG_DST, dst);
    if (has_bias) args.emplace(DNNL_ARG_BIAS, memory(e->bias_md, eng, b.untyped_data()));
    if (e->scratch_bytes) args.emplace(DNNL_ARG_SCRATCHPAD, scratchpad(e->scratch_bytes));
    e->prim.execute(s, args);
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("dreamjax_onednn_conv: oneDNN: ") + err.what());
  }
  return ffi::Error::Success();
}

// --- max-pool input gradient ---------------------------------------------------------------
// dx[N,H,W,C] from g[N,Ho,Wo,C] and the winners' window positions arg[N,Ho,Wo,C] (int8, row-major
// in the window: the first maximum, as ops.max_pool records it). Plain C++, no oneDNN: XLA's own
// form (one strided pad per window position, summed) gets the whole gradient computation that
// produces g fused into each of its 9 reads, recomputed 9 times (55 ms of a 512 px InceptionV3
// step); as a call, g and arg are arrays. The windows are visited in reverse raster order, so a
// pixel shared by several windows adds their gradients in window-position order, as the pads'
// sum does: the same bits.
void maxpool_bwd(const float* g, const int8_t* arg, float* dx, int64_t n, int64_t h, int64_t w, int64_t c, int64_t ho,
                 int64_t wo, int64_t window, int64_t stride) {
  std::memset(dx, 0, sizeof(float) * n * h * w * c);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = ho - 1; i >= 0; --i)
      for (int64_t j = wo - 1; j >= 0; --j) {
        const float* gp = g + ((b * ho + i) * wo + j) * c;
        const int8_t* ap = arg + ((b * ho + i) * wo + j) * c;
        float* base = dx + ((b * h + i * stride) * w + j * stride) * c;
        for (int64_t ch = 0; ch < c; ++ch) {
          int64_t k = ap[ch], ki = k / window, kj = k % window;
          base[(ki * w + kj) * c + ch] += gp[ch];
        }
      }
}

ffi::Error MaxPoolBwd(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S8> arg, ffi::Result<ffi::Buffer<ffi::F32>> dx,
                      int64_t window, int64_t stride) {
  auto gd = g.dimensions(), ad = arg.dimensions(), xd = dx->dimensions();
  if (gd.size() != 4 || ad.size() != 4 || xd.size() != 4)
    return ffi::Error::InvalidArgument("dreamjax_maxpool_bwd: g, arg and dx must be 4-d (NHWC)");
  for (int d = 0; d < 4; ++d)
    if (gd[d] != ad[d]) return ffi::Error::InvalidArgument("dreamjax_maxpool_bwd: g and arg shapes differ");
  if (xd[0] != gd[0] || xd[3] != gd[3] || (gd[1] - 1) * stride + window > xd[1] ||
      (gd[2] - 1) * stride + window > xd[2])
    return ffi::Error::InvalidArgument("dreamjax_maxpool_bwd: dx's shape does not fit the windows");
  maxpool_bwd(g.typed_data(), arg.typed_data(), dx->typed_data(), xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], window,
              stride);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DreamjaxOnednnConv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("relu")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("backward_data")
                                  .Attr<bool>("masked"));

// What the Python side checks before it offers the kernel: 0 = usable with bf16 units,
// 1 = usable but the CPU has no bfloat16 instructions (f32 only), 2 = no CPU engine.
extern "C" __attribute__((visibility("default"))) int dreamjax_onednn_probe() {
  try {
    cpu_engine();
  } catch (const dnnl::error&) {
    return 2;
  }
  auto isa = dnnl::get_effective_cpu_isa();
  auto has = [isa](dnnl::cpu_isa want) {
    return (static_cast<unsigned>(isa) & static_cast<unsigned>(want)) == static_cast<unsigned>(want);
  };  // cpu_isa values are bit sets of instruction groups
  bool bf16 = has(dnnl::cpu_isa::avx512_core_bf16) || has(dnnl::cpu_isa::avx2_vnni_2);
  return bf16 ? 0 : 1;
}

extern "C" __attribute__((visibility("default"))) int dreamjax_onednn_cached_weights() {
  std::lock_guard<std::mutex> lock(weights_mu);
  return static_cast<int>(weights_cache.size());
}

extern "C" __attribute__((visibility("default"))) int dreamjax_onednn_cached_primitives() {
  std::lock_guard<std::mutex> lock(cache_mu);
  return static_cast<int>(cache.size());
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DreamjaxMaxPoolBwd, MaxPoolBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride"));
