// Kernel gradient of a 2-D convolution (NHWC input, HWIO kernel), as an XLA FFI handler for
// the CPU backend:
//
//   dw[i, j, ci, co] = sum_{n, ho, wo} x[n, ho * sh + i - ph, wo * sw + j - pw, ci] * dy[n, ho, wo, co]
//
// where x reads as zero outside the image (the padding). XLA:CPU's own form of this
// reduction (an Eigen convolution with a 32x32 window over the transposed input) runs at a
// third of the machine's matmul peak for the early ResNet stages; this loop nest keeps a
// [6 x 64] block of dw in vector registers and streams one image of x and dy through it per
// task (both stay in L2), so it runs close to the FMA peak. Tasks are whole images, spread
// over XLA's intra-op thread pool; each thread sums into its own dw and the partial sums are
// added at the end.
//
// Float32 only. Requires cout % 16 == 0 (the Python side checks it and otherwise uses XLA).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // floats in one 512-bit vector
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

struct Geometry {
  int64_t n, h, w, cin;  // x
  int64_t ho, wo, cout;  // dy
  int64_t kh, kw, sh, sw, ph, pw;
};

// Strides (in floats) of one tap's walk over a chunk of images.
struct Walk {
  int64_t nimg, nrows, len;    // images, output rows per image, outputs per row
  int64_t x_img, x_row, x_step;  // x: next image, next output row, next output in a row
  int64_t d_img, d_row;          // dy: next image, next output row (next output: cout)
};

// out[c][v * kLanes + lane] += sum over images, rows and outputs of the walk of
//   x[c] * dy[v * kLanes + lane], with x and dy advanced by the walk's strides.
template <int CB, int NV>
void tile(const float* x, const float* dy, const Walk& w, int64_t cout, float* out) {
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

using TileFn = void (*)(const float*, const float*, const Walk&, int64_t, float*);

template <int NV>
TileFn pick_cb(int cb) {
  switch (cb) {
    case 1: return tile<1, NV>;
    case 2: return tile<2, NV>;
    case 3: return tile<3, NV>;
    case 4: return tile<4, NV>;
    case 5: return tile<5, NV>;
    default: return tile<6, NV>;
  }
}

TileFn pick(int cb, int nv) {
  switch (nv) {
    case 1: return pick_cb<1>(cb);
    case 2: return pick_cb<2>(cb);
    case 3: return pick_cb<3>(cb);
    default: return pick_cb<4>(cb);
  }
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
void accumulate_chunk(const Geometry& g, const float* x, const float* dy, int64_t img,
                      int64_t nimg, float* dw) {
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
      const Walk walk{nimg,         r1 - r0,      c1 - c0,
                      g.h * g.w * g.cin, g.sh * g.w * g.cin, g.sw * g.cin,
                      g.ho * g.wo * g.cout, g.wo * g.cout};
      for (int64_t co = 0; co < g.cout; co += 4 * kLanes) {
        const int nv = static_cast<int>(std::min<int64_t>(4, (g.cout - co) / kLanes));
        for (int64_t ci = 0; ci < g.cin; ci += 6) {
          const int cb = static_cast<int>(std::min<int64_t>(6, g.cin - ci));
          pick(cb, nv)(xt + ci, dt + co, walk, g.cout, wt + ci * g.cout + co);
        }
      }
    }
  }
}

// Work shared by the calling thread and the pool tasks. Held by shared_ptr so that a task the
// pool starts only after the call returned finds it alive (and finds no work left).
struct Shared {
  Geometry g;
  const float* x;
  const float* dy;
  int64_t dw_size;
  int64_t chunk;  // images per task
  std::atomic<int64_t> next_image{0};
  std::atomic<int> next_slot{1};  // slot 0 is the calling thread's (the output buffer)
  std::vector<std::vector<float>> partial;  // one per extra slot, sized on first use
  std::mutex mu;
  std::condition_variable cv;
  int running = 0;      // tasks that took a slot and have not finished
  bool closed = false;  // the caller is summing the partials: late tasks must do nothing
};

// Takes chunks of images until none are left, summing into `dw`.
void drain(Shared& s, float* dw) {
  for (int64_t img; (img = s.next_image.fetch_add(s.chunk)) < s.g.n;)
    accumulate_chunk(s.g, s.x, s.dy, img, std::min(s.chunk, s.g.n - img), dw);
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t ph,
                      int64_t pw) {
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || dd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("conv kernel grad: x, dy and dw must be 4-D");
  auto s = std::make_shared<Shared>();
  Geometry& g = s->g;
  g = Geometry{xd[0], xd[1], xd[2], xd[3], dd[1], dd[2], dd[3], wd[0], wd[1], sh, sw, ph, pw};
  if (dd[0] != g.n || wd[2] != g.cin || wd[3] != g.cout || g.cout % kLanes != 0)
    return ffi::Error::InvalidArgument("conv kernel grad: inconsistent shapes");
  if (sh < 1 || sw < 1) return ffi::Error::InvalidArgument("conv kernel grad: strides must be >= 1");
  s->x = x.typed_data();
  s->dy = dy.typed_data();
  s->dw_size = g.kh * g.kw * g.cin * g.cout;
  float* out = dw->typed_data();
  std::fill(out, out + s->dw_size, 0.0f);

  // A chunk's x and dy (about kChunkBytes) stay in L2 while every dw tile walks over them, so
  // dw is read and written once per chunk, not once per image (that made the late stages,
  // with a large dw and small images, memory-bound).
  constexpr int64_t kChunkBytes = 512 * 1024;
  const int64_t image_bytes = (g.h * g.w * g.cin + g.ho * g.wo * g.cout) * sizeof(float);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), g.n));
  s->chunk = std::max<int64_t>(
      1, std::min<int64_t>(kChunkBytes / std::max<int64_t>(image_bytes, 1), g.n / threads));
  s->partial.resize(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([s] {
      int slot;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        if (s->closed || s->next_image.load() >= s->g.n) return;  // nothing left to do
        slot = s->next_slot++;
        ++s->running;
      }
      std::vector<float>& buf = s->partial[slot - 1];
      buf.assign(s->dw_size, 0.0f);
      drain(*s, buf.data());
      std::lock_guard<std::mutex> lock(s->mu);
      --s->running;
      s->cv.notify_all();
    });
  }
  drain(*s, out);
  // Wait only for tasks that took a slot; one still queued finds `closed` and returns.
  std::unique_lock<std::mutex> lock(s->mu);
  s->cv.wait(lock, [&] { return s->running == 0; });
  s->closed = true;
  for (int slot = 1; slot < s->next_slot; ++slot) {
    const float* p = s->partial[slot - 1].data();
    for (int64_t k = 0; k < s->dw_size; ++k) out[k] += p[k];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SimclrConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
