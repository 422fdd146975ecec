// Convolution kernels for XLA:CPU as XLA FFI handlers: NHWC activations, HWIO kernels,
// float32, output channels a multiple of 16 (the Python side checks; otherwise XLA is used).
//
// * SimclrConvKernelGrad, the kernel gradient:
//     dw[i, j, ci, co] = sum_{n, ho, wo} x[n, ho * sh + i - ph, wo * sw + j - pw, ci] * dy[n, ho, wo, co]
//   with x read as zero outside the image (the padding). XLA:CPU computes this as an Eigen
//   convolution with an image-sized window over the transposed input, at a third of the
//   machine's matmul rate for the early ResNet stages.
// * SimclrConvForward, the convolution itself:
//     y[n, ho, wo, co] = sum_{i, j, ci} x[n, ho * sh + i - ph, wo * sw + j - pw, ci] * w[i, j, ci, co]
//   (also the input gradient of a stride-1 convolution: dy with padding k - 1 - p, w flipped
//   and transposed).
//
// Both keep a block of 6 x 64 outputs in 24 vector registers over (most of) the reduction and
// stream chunks of whole images (about kChunkBytes of data, so they stay in L2) through it.
// The work is spread over XLA's intra-op thread pool and the calling thread, in a way that
// keeps results bitwise reproducible from run to run.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // floats in one 512-bit vector
constexpr int kBlock = 6;   // channels (kernel gradient) or pixels (forward) per register block
constexpr int64_t kChunkBytes = 512 * 1024;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

// Runs fn(part) for every part in [0, parts), on the calling thread and on up to threads - 1
// pool tasks, each taking the next part until none is left. The state is held by shared_ptr:
// a task the pool starts only after this returned finds `closed` and does nothing. The caller
// waits only for tasks that started, so a busy pool cannot deadlock it.
void run_parts(ffi::ThreadPool& pool, int64_t threads, int64_t parts,
               std::function<void(int64_t)> fn) {
  struct State {
    int64_t parts;
    std::function<void(int64_t)> fn;
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int running = 0;
    bool closed = false;
    void drain() {
      for (int64_t p; (p = next.fetch_add(1)) < parts;) fn(p);
    }
  };
  auto st = std::make_shared<State>();
  st->parts = parts;
  st->fn = std::move(fn);
  for (int64_t t = 1; t < std::min(threads, parts); ++t) {
    pool.Schedule([st] {
      {
        std::lock_guard<std::mutex> lock(st->mu);
        if (st->closed || st->next.load() >= st->parts) return;
        ++st->running;
      }
      st->drain();
      std::lock_guard<std::mutex> lock(st->mu);
      --st->running;
      st->cv.notify_all();
    });
  }
  st->drain();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->running == 0; });
  st->closed = true;
  st->fn = nullptr;  // its captures live in the caller's frame
}

// fn(b, v) with b and v as compile-time ints (std::integral_constant): b = the block size
// (1..kBlock), v = vectors of 16 output channels (1..4). Maps runtime remainders onto the
// tile templates instantiated for them.
template <int B, typename F>
auto with_block(int b, F&& fn) {
  if constexpr (B == 1) {
    return fn(std::integral_constant<int, 1>{});
  } else {
    return b >= B ? fn(std::integral_constant<int, B>{}) : with_block<B - 1>(b, fn);
  }
}

template <typename F>
auto with_blocks(int b, int v, F&& fn) {
  return with_block<4>(v, [&](auto vv) {
    return with_block<kBlock>(b, [&](auto bb) { return fn(bb, vv); });
  });
}

// A convolution's shapes: input x [n, h, w, cin], output y (or its cotangent dy)
// [n, ho, wo, cout], kernel [kh, kw, cin, cout], strides and low padding.
struct Geometry {
  int64_t n, h, w, cin;
  int64_t ho, wo, cout;
  int64_t kh, kw, sh, sw, ph, pw;
};

// The geometry from x's, y's and the kernel's dimensions, checked; `what` names the handler.
ffi::ErrorOr<Geometry> geometry(const char* what, ffi::Span<const int64_t> xd,
                                ffi::Span<const int64_t> yd, ffi::Span<const int64_t> wd,
                                int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const std::string name(what);
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4)
    return ffi::Unexpected(ffi::Error::InvalidArgument(name + ": operands must be 4-D"));
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
                   wd[0], wd[1], sh,    sw,    ph,    pw};
  if (sh < 1 || sw < 1)
    return ffi::Unexpected(ffi::Error::InvalidArgument(name + ": strides must be >= 1"));
  if (yd[0] != g.n || wd[2] != g.cin || wd[3] != g.cout || g.cout % kLanes != 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument(name + ": inconsistent shapes"));
  return g;
}

int64_t pool_threads(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

// Images per chunk: about kChunkBytes of one image's input and output, at least one, and small
// enough that every thread gets a chunk.
int64_t chunk_images(const Geometry& g, int64_t threads) {
  const int64_t bytes = (g.h * g.w * g.cin + g.ho * g.wo * g.cout) * sizeof(float);
  return std::max<int64_t>(1, std::min<int64_t>(kChunkBytes / std::max<int64_t>(bytes, 1),
                                                g.n / threads));
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient.

// Strides (in floats) of one tap's walk over a chunk of images.
struct Walk {
  int64_t nimg, nrows, len;      // images, output rows per image, outputs per row
  int64_t x_img, x_row, x_step;  // x: next image, next output row, next output in a row
  int64_t d_img, d_row;          // dy: next image, next output row (next output: cout)
};

// out[c][v * kLanes + lane] += sum over images, rows and outputs of the walk of
//   x[c] * dy[v * kLanes + lane], with x and dy advanced by the walk's strides.
template <int CB, int NV>
void grad_tile(const float* x, const float* dy, const Walk& w, int64_t cout, float* out) {
  vec acc[CB][NV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = load(out + c * cout + v * kLanes);
  for (int64_t m = 0; m < w.nimg; ++m) {
    for (int64_t r = 0; r < w.nrows; ++r) {
      const float* xp = x + m * w.x_img + r * w.x_row;
      const float* dp = dy + m * w.d_img + r * w.d_row;
      for (int64_t k = 0; k < w.len; ++k) {
        vec d[NV];
        for (int v = 0; v < NV; ++v) d[v] = load(dp + v * kLanes);
        for (int c = 0; c < CB; ++c) {
          const float b = xp[c];
          for (int v = 0; v < NV; ++v) acc[c][v] += b * d[v];
        }
        xp += w.x_step;
        dp += cout;
      }
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v) store(out + c * cout + v * kLanes, acc[c][v]);
}

using GradTileFn = void (*)(const float*, const float*, const Walk&, int64_t, float*);

GradTileFn grad_pick(int cb, int nv) {
  return with_blocks(cb, nv, [](auto c, auto v) -> GradTileFn { return grad_tile<c, v>; });
}

// First index o in [0, n_out) with o * s + off >= 0, and one past the last with
// o * s + off < size: the outputs whose input position (for one tap) lies inside the image.
inline void valid_range(int64_t n_out, int64_t s, int64_t off, int64_t size, int64_t* lo,
                        int64_t* hi) {
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  int64_t b = size - off <= 0 ? 0 : (size - off + s - 1) / s;
  *lo = std::min(a, n_out);
  *hi = std::max(*lo, std::min(b, n_out));
}

// dw (+)= the contribution of images [img, img + nimg).
void grad_chunk(const Geometry& g, const float* x, const float* dy, int64_t img, int64_t nimg,
                float* dw) {
  const float* xi = x + img * g.h * g.w * g.cin;
  const float* di = dy + img * g.ho * g.wo * g.cout;
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t r0, r1;
    valid_range(g.ho, g.sh, i - g.ph, g.h, &r0, &r1);
    if (r1 <= r0) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t c0, c1;
      valid_range(g.wo, g.sw, j - g.pw, g.w, &c0, &c1);
      if (c1 <= c0) continue;
      const float* xt = xi + ((r0 * g.sh + i - g.ph) * g.w + (c0 * g.sw + j - g.pw)) * g.cin;
      const float* dt = di + (r0 * g.wo + c0) * g.cout;
      float* wt = dw + (i * g.kw + j) * g.cin * g.cout;
      const Walk walk{nimg,
                      r1 - r0,
                      c1 - c0,
                      g.h * g.w * g.cin,
                      g.sh * g.w * g.cin,
                      g.sw * g.cin,
                      g.ho * g.wo * g.cout,
                      g.wo * g.cout};
      for (int64_t co = 0; co < g.cout; co += 4 * kLanes) {
        const int nv = static_cast<int>(std::min<int64_t>(4, (g.cout - co) / kLanes));
        for (int64_t ci = 0; ci < g.cin; ci += kBlock) {
          const int cb = static_cast<int>(std::min<int64_t>(kBlock, g.cin - ci));
          grad_pick(cb, nv)(xt + ci, dt + co, walk, g.cout, wt + ci * g.cout + co);
        }
      }
    }
  }
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t ph,
                      int64_t pw) {
  const auto checked = geometry("conv kernel grad", x.dimensions(), dy.dimensions(),
                                dw->dimensions(), sh, sw, ph, pw);
  if (checked.has_error()) return checked.error();
  const Geometry& g = checked.value();
  const float* xp = x.typed_data();
  const float* dp = dy.typed_data();
  const int64_t size = g.kh * g.kw * g.cin * g.cout;
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  // The images are split into one fixed range per thread, each summed into its own dw (the
  // first into the output) and added up in order at the end, so the result does not depend on
  // which thread ran what: runs are reproducible. Within a range, chunks of images stay in L2
  // while every dw tile walks over them, so dw is read and written once per chunk, not once
  // per image (that made the late stages memory-bound).
  const int64_t threads = pool_threads(pool, g.n);
  std::vector<std::vector<float>> partial(threads - 1);  // zeroed by the thread that fills it
  const int64_t chunk = chunk_images(g, threads);
  run_parts(pool, threads, threads, [&](int64_t part) {
    if (part > 0) partial[part - 1].assign(size, 0.0f);
    float* acc = part == 0 ? out : partial[part - 1].data();
    const int64_t end = g.n * (part + 1) / threads;
    for (int64_t img = g.n * part / threads; img < end; img += chunk)
      grad_chunk(g, xp, dp, img, std::min(chunk, end - img), acc);
  });
  for (const auto& buf : partial)
    for (int64_t k = 0; k < size; ++k) out[k] += buf[k];
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Forward convolution. A tile is R output pixels (consecutive in the image, possibly across
// rows) x NV * 16 output channels, kept in registers over one kernel row (kw taps) of up to
// kFwdChannels input channels, read at stride tap_x in x and tap_w in w.

template <int R, int NV>
void fwd_tile(const float* const* xr, const float* w, int64_t taps, int64_t tap_x, int64_t tap_w,
              int64_t k, int64_t cout, bool first, float* const* yr) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? vec{} : load(yr[r] + v * kLanes);
  for (int64_t t = 0; t < taps; ++t) {
    const float* wp = w + t * tap_w;
    const int64_t off = t * tap_x;
    for (int64_t ci = 0; ci < k; ++ci) {
      vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(wp + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float b = xr[r][off + ci];
        for (int v = 0; v < NV; ++v) acc[r][v] += b * wv[v];
      }
      wp += cout;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(yr[r] + v * kLanes, acc[r][v]);
}

using FwdTileFn = void (*)(const float* const*, const float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, bool, float* const*);

FwdTileFn fwd_pick(int r, int nv) {
  return with_blocks(r, nv, [](auto p, auto v) -> FwdTileFn { return fwd_tile<p, v>; });
}

// Input channels per pass over the chunk: the weights of one (kernel row, channel block, 64
// outputs) stay in L1/L2 while every pixel tile of the chunk uses them.
constexpr int64_t kFwdChannels = 128;

// One pass covers a whole kernel row (kw taps): for a pixel whose taps all lie inside the
// image, the kw input segments are kw consecutive pixels of x, so the tile reads them at
// stride cin. A pixel with some taps in the padding reads a copy of its segments with zeros
// in the padding (`scratch`, the same layout), one wholly in the padding reads `zeros`.
void forward_chunk(const Geometry& g, const float* x, const float* w, int64_t img,
                   int64_t nimg, float* y) {
  const int64_t pixels = g.ho * g.wo;
  std::vector<float> zeros(g.kw * g.cin, 0.0f);
  std::vector<float> scratch(kBlock * g.kw * g.cin);
  for (int64_t co = 0; co < g.cout; co += 4 * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (g.cout - co) / kLanes));
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t c0 = 0; c0 < g.cin; c0 += kFwdChannels) {
        const int64_t k = std::min<int64_t>(kFwdChannels, g.cin - c0);
        const bool first = i == 0 && c0 == 0;
        const float* wt = w + (i * g.kw * g.cin + c0) * g.cout + co;
        for (int64_t m = img; m < img + nimg; ++m) {
          const float* xi = x + m * g.h * g.w * g.cin + c0;
          float* yi = y + m * pixels * g.cout + co;
          int64_t oh = 0, ow = 0;  // of pixel p
          for (int64_t p = 0; p < pixels; p += kBlock) {
            const int r = static_cast<int>(std::min<int64_t>(kBlock, pixels - p));
            const float* xr[kBlock];
            float* yr[kBlock];
            for (int q = 0; q < r; ++q) {
              const int64_t hi = oh * g.sh + i - g.ph, wi = ow * g.sw - g.pw;
              yr[q] = yi + (p + q) * g.cout;
              if (hi < 0 || hi >= g.h) {
                xr[q] = zeros.data();
              } else if (wi >= 0 && wi + g.kw <= g.w) {
                xr[q] = xi + (hi * g.w + wi) * g.cin;
              } else {
                float* sq = scratch.data() + q * g.kw * g.cin;
                for (int64_t j = 0; j < g.kw; ++j) {
                  float* dst = sq + j * g.cin;
                  if (wi + j >= 0 && wi + j < g.w)
                    std::copy_n(xi + (hi * g.w + wi + j) * g.cin, k, dst);
                  else
                    std::fill_n(dst, k, 0.0f);
                }
                xr[q] = sq;
              }
              if (++ow == g.wo) ow = 0, ++oh;
            }
            fwd_pick(r, nv)(xr, wt, g.kw, g.cin, g.cin * g.cout, k, g.cout, first, yr);
          }
        }
      }
    }
  }
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw) {
  const auto checked =
      geometry("conv forward", x.dimensions(), y->dimensions(), w.dimensions(), sh, sw, ph, pw);
  if (checked.has_error()) return checked.error();
  const Geometry& g = checked.value();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = pool_threads(pool, g.n);
  const int64_t chunk = chunk_images(g, threads);
  // Every output is computed by one thread in a fixed order: reproducible whatever the split.
  run_parts(pool, threads, (g.n + chunk - 1) / chunk, [&](int64_t part) {
    forward_chunk(g, xp, wp, part * chunk, std::min(chunk, g.n - part * chunk), yp);
  });
  return ffi::Error::Success();
}

}  // namespace

// Both handlers take (thread pool, two float32 operands, one float32 result, sh, sw, ph, pw).
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("ph")
      .Attr<int64_t>("pw");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SimclrConvKernelGrad, KernelGrad, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SimclrConvForward, ConvForward, ConvBinding());
