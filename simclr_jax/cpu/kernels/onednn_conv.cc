// oneDNN convolutions as XLA:CPU FFI handlers: NHWC activations, HWIO kernels, float32.
//
//   SimclrOnednnConvForward         (x, w)  -> y    y  = conv(x, w)
//   SimclrOnednnConvBackwardData    (dy, w) -> dx   dx = d conv(x, w) / dx  applied to dy
//   SimclrOnednnConvBackwardWeights (x, dy) -> dw   dw = d conv(x, w) / dw  applied to dy
//
// Attributes: sh, sw (strides), ph0, ph1, pw0, pw1 (low/high zero padding of height/width).
// Activations stay NHWC (oneDNN's `nhwc`, what PyTorch's channels_last hands it); the kernel
// is reordered from/to HWIO into the layout the chosen oneDNN kernel prefers. Primitives (and
// their reorders) are created once per shape and direction and kept for the process.
//
// Threads: the oneDNN build runs on OpenMP; every call runs under one process-wide lock, so at
// most one convolution's OpenMP team is busy at a time (several XLA devices in one process, or
// independent convolutions XLA runs concurrently, take turns instead of oversubscribing the
// cores). GNU OpenMP keeps a pool of workers per thread that ever called in (XLA threads x
// (OMP_NUM_THREADS - 1) threads, mostly asleep). The scratchpad is user-managed, and shared
// under the lock.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

enum Direction : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// One convolution's geometry, in oneDNN's logical (NCHW / OIHW) dims.
struct Shape {
  int64_t n, cin, h, w, cout, kh, kw, ho, wo, sh, sw, ph0, ph1, pw0, pw1;
  std::array<int64_t, 16> key(Direction d) const {
    return {d, n, cin, h, w, cout, kh, kw, ho, wo, sh, sw, ph0, ph1, pw0, pw1};
  }
};

// A cached convolution: the primitive, the kernel layout it wants and the reorder between that
// layout and HWIO (to it for forward / backward data, from it for backward weights).
struct Cached {
  dnnl::primitive conv;
  memory::desc kernel_md;  // the primitive's kernel layout
  memory::desc user_kernel_md;  // HWIO
  bool reorder_kernel = false;
  dnnl::reorder reorder;
  memory::desc scratchpad_md;
  memory::desc src_md, dst_md;  // the activations' layout (NHWC, or nChw16c at 16 channels)
};

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  // Held while a convolution is looked up, built and run: one OpenMP team at a time. (Letting
  // XLA's threads run convolutions concurrently, with 1 or with all OpenMP threads each,
  // measured slower.) Guards everything below.
  std::mutex mu;
  std::map<std::array<int64_t, 16>, std::unique_ptr<Cached>> cache;
  std::unique_ptr<dnnl::stream> stream;
  std::vector<char> scratchpad, kernel_buffer;
};

Runtime& runtime() {
  static Runtime* rt = new Runtime();  // never destroyed: handlers may run during exit
  return *rt;
}

// The layout the NHWC activations are described to oneDNN in. With exactly 16 channels,
// oneDNN's blocked layout nChw16c is the same bytes as NHWC; where input and output both have
// 16 channels, declaring it lets oneDNN 3.2 pick its blocked direct kernels for the forward
// pass and the input gradient, faster there than its NHWC kernels (docs/performance.md); for
// the kernel gradient NHWC is faster. (A blocked tensor beside an NHWC one gets the reference
// kernel, hundreds of times slower: both or neither.) Only where a blocked kernel exists for
// this CPU (AVX-512): `build` falls back to NHWC when oneDNN would take its reference kernel.
Tag activation_tag(const Shape& s, Direction d) {
  return s.cin == 16 && s.cout == 16 && d != kBackwardWeights ? Tag::nChw16c : Tag::nhwc;
}

bool is_reference(const dnnl::primitive_desc_base& pd) {
  return std::string(pd.impl_info_str()).rfind("ref", 0) == 0;
}

// Takes one direction's primitive into `c`; `kernel_md` is the kernel (or kernel gradient)
// layout it wants. Returns whether oneDNN chose its reference (slow) implementation.
template <typename Primitive, typename PrimitiveDesc>
bool adopt(Cached* c, const PrimitiveDesc& pd, const memory::desc& kernel_md) {
  c->conv = Primitive(pd);
  c->kernel_md = kernel_md;
  c->scratchpad_md = pd.scratchpad_desc();
  return is_reference(pd);
}

// The primitive of one shape and direction, with the activation layout `tag`.
std::unique_ptr<Cached> build_with(Runtime& rt, const Shape& s, Direction d, Tag tag) {
  const memory::dims src_dims = {s.n, s.cin, s.h, s.w};
  const memory::dims dst_dims = {s.n, s.cout, s.ho, s.wo};
  const memory::dims kernel_dims = {s.cout, s.cin, s.kh, s.kw};
  const memory::dims strides = {s.sh, s.sw}, pad_l = {s.ph0, s.pw0}, pad_r = {s.ph1, s.pw1};
  const memory::desc src(src_dims, kF32, tag), dst(dst_dims, kF32, tag);
  const memory::desc kernel_any(kernel_dims, kF32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(rt.engine, dnnl::prop_kind::forward_training,
                                                algo, src, kernel_any, dst, strides, pad_l,
                                                pad_r, attr);
  auto c = std::make_unique<Cached>();
  c->user_kernel_md = memory::desc(kernel_dims, kF32, Tag::hwio);
  c->src_md = src;
  c->dst_md = dst;
  bool reference;
  if (d == kForward) {
    reference = adopt<dnnl::convolution_forward>(c.get(), fwd, fwd.weights_desc());
  } else if (d == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(rt.engine, algo, src, kernel_any, dst,
                                                        strides, pad_l, pad_r, fwd, attr);
    reference = adopt<dnnl::convolution_backward_data>(c.get(), bwd, bwd.weights_desc());
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(rt.engine, algo, src, kernel_any, dst,
                                                           strides, pad_l, pad_r, fwd, attr);
    reference = adopt<dnnl::convolution_backward_weights>(c.get(), bwd, bwd.diff_weights_desc());
  }
  if (reference && tag != Tag::nhwc) return nullptr;  // no blocked kernel on this CPU
  c->reorder_kernel = c->kernel_md != c->user_kernel_md;
  if (c->reorder_kernel) {
    c->reorder = d == kBackwardWeights
                     ? dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine, c->kernel_md,
                                                                   rt.engine, c->user_kernel_md))
                     : dnnl::reorder(dnnl::reorder::primitive_desc(
                           rt.engine, c->user_kernel_md, rt.engine, c->kernel_md));
  }
  return c;
}

Cached* build(Runtime& rt, const Shape& s, Direction d) {
  std::unique_ptr<Cached> c = build_with(rt, s, d, activation_tag(s, d));
  if (!c) c = build_with(rt, s, d, Tag::nhwc);
  Cached* out = c.get();
  rt.cache[s.key(d)] = std::move(c);
  return out;
}

void* resized(std::vector<char>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// Runs one direction. `src`, `dst` and `kernel` are the NHWC input, NHWC output and HWIO kernel
// of the forward convolution (read or written as the direction says).
ffi::Error run(const Shape& s, Direction d, float* src, float* dst, float* kernel) {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mu);
  try {
    if (!rt.stream) rt.stream = std::make_unique<dnnl::stream>(rt.engine);
    dnnl::stream& stream = *rt.stream;
    auto it = rt.cache.find(s.key(d));
    Cached* c = it != rt.cache.end() ? it->second.get() : build(rt, s, d);
    memory src_m(c->src_md, rt.engine, src);
    memory dst_m(c->dst_md, rt.engine, dst);
    memory user_kernel(c->user_kernel_md, rt.engine, kernel);
    memory conv_kernel = user_kernel;
    if (c->reorder_kernel) {
      conv_kernel = memory(c->kernel_md, rt.engine,
                           resized(rt.kernel_buffer, c->kernel_md.get_size()));
    }
    memory scratchpad(c->scratchpad_md, rt.engine,
                      resized(rt.scratchpad, c->scratchpad_md.get_size()));
    if (d != kBackwardWeights && c->reorder_kernel) {
      c->reorder.execute(stream, user_kernel, conv_kernel);
    }
    if (d == kForward) {
      c->conv.execute(stream, {{DNNL_ARG_SRC, src_m},
                                  {DNNL_ARG_WEIGHTS, conv_kernel},
                                  {DNNL_ARG_DST, dst_m},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (d == kBackwardData) {
      c->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m},
                                  {DNNL_ARG_WEIGHTS, conv_kernel},
                                  {DNNL_ARG_DIFF_DST, dst_m},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      c->conv.execute(stream, {{DNNL_ARG_SRC, src_m},
                                  {DNNL_ARG_DIFF_WEIGHTS, conv_kernel},
                                  {DNNL_ARG_DIFF_DST, dst_m},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (c->reorder_kernel) c->reorder.execute(stream, conv_kernel, user_kernel);
    }
    stream.wait();
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc, ...
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution failed: ") + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution failed");
  }
  return ffi::Error::Success();
}

// The geometry from the NHWC activations [n, h, w, cin] and [n, ho, wo, cout] and the HWIO
// kernel dims, checked against the attributes.
ffi::ErrorOr<Shape> shape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
                          ffi::Span<const int64_t> k, int64_t sh, int64_t sw, int64_t ph0,
                          int64_t ph1, int64_t pw0, int64_t pw1) {
  if (x.size() != 4 || y.size() != 4 || k.size() != 4) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("oneDNN conv: operands must be 4-D (NHWC, HWIO)"));
  }
  Shape s{x[0], x[3], x[1], x[2], y[3], k[0], k[1], y[1], y[2], sh, sw, ph0, ph1, pw0, pw1};
  const bool ok = s.sh >= 1 && s.sw >= 1 && ph0 >= 0 && ph1 >= 0 && pw0 >= 0 && pw1 >= 0 &&
                  s.kh >= 1 && s.kw >= 1 && s.h + ph0 + ph1 >= s.kh && s.w + pw0 + pw1 >= s.kw &&
                  y[0] == s.n && k[2] == s.cin && k[3] == s.cout &&
                  s.ho == (s.h + ph0 + ph1 - s.kh) / s.sh + 1 &&
                  s.wo == (s.w + pw0 + pw1 - s.kw) / s.sw + 1 && s.ho >= 1 && s.wo >= 1;
  if (!ok) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "oneDNN conv: shapes, strides and paddings do not describe one convolution"));
  }
  return s;
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 w, F32Out y, int64_t sh, int64_t sw, int64_t ph0, int64_t ph1,
                   int64_t pw0, int64_t pw1) {
  auto s = shape(x.dimensions(), y->dimensions(), w.dimensions(), sh, sw, ph0, ph1, pw0, pw1);
  if (s.has_error()) return s.error();
  return run(s.value(), kForward, x.typed_data(), y->typed_data(), w.typed_data());
}

ffi::Error BackwardData(F32 dy, F32 w, F32Out dx, int64_t sh, int64_t sw, int64_t ph0,
                        int64_t ph1, int64_t pw0, int64_t pw1) {
  auto s = shape(dx->dimensions(), dy.dimensions(), w.dimensions(), sh, sw, ph0, ph1, pw0, pw1);
  if (s.has_error()) return s.error();
  return run(s.value(), kBackwardData, dx->typed_data(), dy.typed_data(), w.typed_data());
}

ffi::Error BackwardWeights(F32 x, F32 dy, F32Out dw, int64_t sh, int64_t sw, int64_t ph0,
                           int64_t ph1, int64_t pw0, int64_t pw1) {
  auto s = shape(x.dimensions(), dy.dimensions(), dw->dimensions(), sh, sw, ph0, ph1, pw0, pw1);
  if (s.has_error()) return s.error();
  return run(s.value(), kBackwardWeights, x.typed_data(), dy.typed_data(), dw->typed_data());
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Ret<F32>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("ph0")
      .Attr<int64_t>("ph1")
      .Attr<int64_t>("pw0")
      .Attr<int64_t>("pw1");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SimclrOnednnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SimclrOnednnConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SimclrOnednnConvBackwardWeights, BackwardWeights, Binding());
