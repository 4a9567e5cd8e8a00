// Fused CPU kernels of the 3D deformable convolution (multicure_monai.networks.deform_conv).
//
// Two entry points per direction:
//  * columns / backward: one chunk of output voxels; the Python side keeps the chunk loop, the GEMMs and the
//    weight groups. They replace the per-chunk trilinear gather (forward) and the gather / scatter /
//    coordinate-gradient passes (backward) of the pure PyTorch "gather" implementation.
//  * fused_forward / fused_backward (one weight group): the whole convolution. Each thread takes blocks of
//    output voxels, samples a block's columns into a private buffer that stays in its cache and multiplies them
//    by the weights there (single-threaded at::mm inside the parallel region), so the columns, K*C values per
//    output voxel, never travel through main memory.
// Parallel over output voxels with OpenMP, the runtime PyTorch itself uses. Both compute exactly the function
// of the gather path: zero padding, a sample whose coordinate lies outside (-1, size) on any axis reads zero,
// every corner outside the volume contributes zero. Both sweep a block of output voxels kernel point by kernel
// point, so that the trilinear set-up of a block's samples runs as one SIMD loop (BlockScratch::prepare). The fused
// kernels are compiled for 16, 32 and 64 channels per offset group as constants (dispatch_channels).
//
// Layouts (all contiguous):
//   x      (B, D, H, W, C)        input, channels last
//   offset (B, G, K, 3, S)        displacement of kernel point k of offset group g along axis a (0 D, 1 H, 2 W)
//   mask   (B, G, K, S) or empty  modulation
//   cols   (n, K, C)              sampled (and modulated) columns of output voxels s0..s1 of batch item b
//   gcols  (n, K, C)              gradient w.r.t. cols
// with K = kd*kh*kw in raster order, S = Do*Ho*Wo, channels c of offset group g: g*C/G .. (g+1)*C/G - 1.

#include <torch/extension.h>

#include <omp.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t B, C, D, H, W, G, Cg, K;
  int64_t stride[3], padding[3];  // per axis (D, H, W)
  int64_t Ho, Wo, S;              // output height, width, number of voxels
  std::vector<int64_t> kdisp;     // (K, 3) displacement of every kernel point from the window origin
  int64_t coff[8];                // element offset of trilinear corner (a, b, e) = 4a + 2b + e from corner 0
  // element strides of the offset view (B, G, K, 3, S), the mask view (B, G, K, S) and of their gradients
  int64_t os[5], ms[4], gos[5], gms[4];
  // element index of (b, gr, k, axis 0, s) / (b, gr, k, s) for strides st
  static inline int64_t index5(const int64_t* st, int64_t b, int64_t gr, int64_t k, int64_t s) {
    return b * st[0] + gr * st[1] + k * st[2] + s * st[4];
  }
  static inline int64_t index4(const int64_t* st, int64_t b, int64_t gr, int64_t k, int64_t s) {
    return b * st[0] + gr * st[1] + k * st[2] + s * st[3];
  }
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                       std::vector<int64_t> ksize,
                       std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                       std::vector<int64_t> out_size) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(), "x must be a contiguous (B, D, H, W, C) tensor");
  TORCH_CHECK(offset.dim() == 5, "offset must be a (B, G, K, 3, S) view (any strides)");
  TORCH_CHECK(ksize.size() == 3 && stride.size() == 3 && padding.size() == 3 && dilation.size() == 3 &&
                  out_size.size() == 3,
              "geometry arguments must have 3 entries");
  Geometry g;
  g.B = x.size(0);
  g.D = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.C = x.size(4);
  g.G = offset.size(1);
  g.K = offset.size(2);
  TORCH_CHECK(g.C % g.G == 0, "channels must be divisible by the offset groups");
  g.Cg = g.C / g.G;
  TORCH_CHECK(ksize[0] * ksize[1] * ksize[2] == g.K, "kernel size does not match the offset layout");
  for (int a = 0; a < 3; ++a) {
    g.stride[a] = stride[a];
    g.padding[a] = padding[a];
  }
  g.Ho = out_size[1];
  g.Wo = out_size[2];
  g.S = out_size[0] * g.Ho * g.Wo;
  g.kdisp.resize(3 * g.K);
  for (int64_t k = 0; k < g.K; ++k) {  // raster order over (kd, kh, kw): the last axis varies fastest
    int64_t r = k;
    for (int a = 2; a >= 0; --a) {
      g.kdisp[3 * k + a] = (r % ksize[a]) * dilation[a];
      r /= ksize[a];
    }
  }
  for (int c = 0; c < 8; ++c) g.coff[c] = (((c >> 2) * g.H + ((c >> 1) & 1)) * g.W + (c & 1)) * g.C;
  TORCH_CHECK(offset.size(0) == g.B && offset.size(3) == 3 && offset.size(4) == g.S, "offset shape mismatch");
  for (int a = 0; a < 5; ++a) g.os[a] = g.gos[a] = offset.stride(a);
  std::fill(g.ms, g.ms + 4, 0);
  std::fill(g.gms, g.gms + 4, 0);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == g.B && mask->size(1) == g.G && mask->size(2) == g.K &&
                    mask->size(3) == g.S && mask->scalar_type() == x.scalar_type(),
                "mask must be a (B, G, K, S) view of x's dtype");
    for (int a = 0; a < 4; ++a) g.ms[a] = mask->stride(a);
  }
  return g;
}

// The 8 trilinear corners of a sample, as pointers, so that one channel loop serves all eight: src[c] is the
// corner's row of channel group gr (or `zeros` when the corner lies outside the volume: it reads zero), dst[c]
// its row in the input-gradient accumulator (or `sink` outside, discarded); w holds the interpolation weights and
// frac the sample's fractional coordinates (d, h, w), with which the offset gradient interpolates.
template <typename T>
struct Corners {
  const T* src[8];
  T* dst[8];
  T w[8];
  T frac[3];
};

// Records the sample's fractional coordinates in `cr` and writes the per-axis interpolation weights (1 - t, t).
template <typename T>
inline void set_fractions(Corners<T>& cr, T td, T th, T tw, T* ad, T* ah, T* aw) {
  cr.frac[0] = td;
  cr.frac[1] = th;
  cr.frac[2] = tw;
  ad[0] = T(1) - td, ad[1] = td, ah[0] = T(1) - th, ah[1] = th, aw[0] = T(1) - tw, aw[1] = tw;
}

// Corner c = 4a + 2b + e of `cr`: its rows and its interpolation weight from the per-axis weights ad / ah / aw of
// the sample's fractional coordinates.
template <typename T>
inline void set_corner(Corners<T>& cr, int c, const T* src, T* dst, const T* ad, const T* ah, const T* aw) {
  const int a = c >> 2, b = (c >> 1) & 1, e = c & 1;
  cr.src[c] = src;
  cr.dst[c] = dst;
  cr.w[c] = ad[a] * ah[b] * aw[e];
}

// Fills `cr` for a sample at (qd, qh, qw) with a corner outside the volume (BlockScratch::corners takes the others);
// returns false when the sample reads zero (outside (-1, size) on some axis). xg / gxg: this batch item's rows
// offset to channel group gr (gxg null: no dst).
template <typename T>
inline bool trilinear_corners(const Geometry& g, T qd, T qh, T qw, const T* xg, T* gxg, const T* zeros, T* sink,
                              Corners<T>& cr) {
  if (!(qd > T(-1) && qd < T(g.D) && qh > T(-1) && qh < T(g.H) && qw > T(-1) && qw < T(g.W))) return false;
  const T fd = std::floor(qd), fh = std::floor(qh), fw = std::floor(qw);
  const int64_t id = static_cast<int64_t>(fd), ih = static_cast<int64_t>(fh), iw = static_cast<int64_t>(fw);
  T ad[2], ah[2], aw[2];
  set_fractions<T>(cr, qd - fd, qh - fh, qw - fw, ad, ah, aw);
  int c = 0;
  for (int a = 0; a < 2; ++a) {
    const int64_t d = id + a;
    const bool vd = d >= 0 && d < g.D;
    for (int b = 0; b < 2; ++b) {
      const int64_t h = ih + b;
      const bool vh = h >= 0 && h < g.H;
      for (int e = 0; e < 2; ++e, ++c) {
        const int64_t x = iw + e;
        if (vd && vh && x >= 0 && x < g.W) {
          const int64_t r = ((d * g.H + h) * g.W + x) * g.C;
          set_corner<T>(cr, c, xg + r, gxg == nullptr ? sink : gxg + r, ad, ah, aw);
        } else {
          cr.src[c] = zeros;
          cr.dst[c] = sink;
          cr.w[c] = T(0);
        }
      }
    }
  }
  return true;
}

// Values of type T per SIMD register of the ISA the kernels are built for (AVX-512 or AVX2).
#if defined(__AVX512F__)
template <typename T>
constexpr int kLanes = 64 / sizeof(T);
#else
template <typename T>
constexpr int kLanes = 32 / sizeof(T);
#endif

// Sum of the L values of one register's worth of lanes, by halving (the compiler's own reduction of an array
// is a chain of scalar adds); the float cases use the ISA's shuffles.
template <typename T, int L>
inline T lane_sum(const T* v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && L == 16) return _mm512_reduce_add_ps(_mm512_loadu_ps(v));
  if constexpr (std::is_same<T, double>::value && L == 8) return _mm512_reduce_add_pd(_mm512_loadu_pd(v));
#elif defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value && L == 8) {
    const __m256 x = _mm256_loadu_ps(v);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
#endif
  T r[L];
  for (int j = 0; j < L; ++j) r[j] = v[j];
  for (int half = L / 2; half > 0; half /= 2)
    for (int j = 0; j < half; ++j) r[j] += r[j + half];
  return r[0];
}

// Output voxels per block of the chunk entry points (the fused ones take theirs from the caller).
constexpr int64_t kSampleBlock = 64;

// Per-thread scratch of the sweeps over a block of n output voxels. For one kernel point and offset group,
// prepare() computes in one SIMD pass what every sample of the block needs: its coordinates and, when its 8
// corners all lie inside the volume (the common case), the element index of corner 0 and the fractional parts, so
// that corners() fills a sample's corners without a branch; a sample at the border, outside or NaN (base -1)
// takes trilinear_corners. zeros / sink: what a corner outside the volume reads / where its gradient goes; val:
// the sampled values of one sample.
template <typename T>
struct BlockScratch {
  std::vector<T> zeros, sink, val;
  std::vector<T> org, q, t;  // (3, n) window origins per axis (integers), sample coordinates, fractional parts
  std::vector<int64_t> base;  // (n) corner-0 index or -1
  int64_t n = 0;

  explicit BlockScratch(int64_t cg) : zeros(cg, T(0)), sink(cg, T(0)), val(cg, T(0)) {}

  // Window origins of output voxels s0 .. s0 + n_ - 1; kernel point k samples at origin + kdisp[k] + offset.
  void origins(const Geometry& g, int64_t s0, int64_t n_) {
    n = n_;
    org.resize(3 * n);
    base.resize(n);
    q.resize(3 * n);
    t.resize(3 * n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = s0 + i, pos[3] = {s / (g.Ho * g.Wo), (s / g.Wo) % g.Ho, s % g.Wo};
      for (int a = 0; a < 3; ++a) org[a * n + i] = T(pos[a] * g.stride[a] - g.padding[a]);
    }
  }

  // Kernel point k of the block, o: its offsets at the block's first voxel (axis stride os[3], voxel os[4]).
  // Unit voxel stride (the contiguous offsets of a convolution's output) gets its own loop: a runtime stride
  // keeps the compiler from vectorising it. Corner indices go through int32 (a coordinate inside the volume
  // fits), for which every ISA has a vector conversion.
  void prepare(const Geometry& g, const T* o, int64_t k) {
    if (g.os[4] == 1)
      prepare_strided(g, o, k, std::integral_constant<int64_t, 1>{});
    else
      prepare_strided(g, o, k, g.os[4]);
  }

  template <typename Stride>
  void prepare_strided(const Geometry& g, const T* o, int64_t k, Stride so) {
    const T *od = org.data(), *oh = od + n, *ow = oh + n;
    const T kd = T(g.kdisp[3 * k]), kh = T(g.kdisp[3 * k + 1]), kw = T(g.kdisp[3 * k + 2]);
    const int64_t sa = g.os[3], HWC = g.H * g.W * g.C, WC = g.W * g.C, C = g.C;
    const T dm = T(g.D - 1), hm = T(g.H - 1), wm = T(g.W - 1);
    T *qd = q.data(), *qh = qd + n, *qw = qh + n, *td = t.data(), *th = td + n, *tw = th + n;
    int64_t* bs = base.data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T a = (od[i] + kd) + o[i * so], b = (oh[i] + kh) + o[i * so + sa], c = (ow[i] + kw) + o[i * so + 2 * sa];
      const T fa = std::floor(a), fb = std::floor(b), fc = std::floor(c);
      qd[i] = a;
      qh[i] = b;
      qw[i] = c;
      td[i] = a - fa;
      th[i] = b - fb;
      tw[i] = c - fc;
      const bool in = fa >= T(0) && fa < dm && fb >= T(0) && fb < hm && fc >= T(0) && fc < wm;
      const T ia = in ? fa : T(0), ib = in ? fb : T(0), ic = in ? fc : T(0);  // no cast of an out-of-range value
      bs[i] = in ? int64_t(static_cast<int32_t>(ia)) * HWC + int64_t(static_cast<int32_t>(ib)) * WC +
                       int64_t(static_cast<int32_t>(ic)) * C
                 : int64_t(-1);
    }
  }

  // The corners of sample i of the prepared kernel point (see trilinear_corners; false: it reads zero).
  inline bool corners(const Geometry& g, int64_t i, const T* xg, T* gxg, Corners<T>& cr) {
    const int64_t b0 = base[i];
    if (b0 < 0)
      return trilinear_corners<T>(g, q[i], q[n + i], q[2 * n + i], xg, gxg, zeros.data(), sink.data(), cr);
    T ad[2], ah[2], aw[2];
    set_fractions<T>(cr, t[i], t[n + i], t[2 * n + i], ad, ah, aw);
    for (int c = 0; c < 8; ++c)
      set_corner<T>(cr, c, xg + b0 + g.coff[c], gxg == nullptr ? sink.data() : gxg + b0 + g.coff[c], ad, ah, aw);
    return true;
  }
};

// Sampled (and modulated) columns (n, K, C) of output voxels first .. first + n - 1 of batch item b, written to dst:
// kernel point by kernel point, one pass over the channels per sample for all 8 corners.
template <typename T, int CG = 0>
inline void sample_block(const Geometry& g, const T* xb, const T* off, const T* mask, int64_t b, int64_t first,
                         int64_t n, T* dst, BlockScratch<T>& sc) {
  Corners<T> cr;
  const int64_t cg = CG > 0 ? CG : g.Cg, KC = g.K * g.C;
  sc.origins(g, first, n);
  for (int64_t k = 0; k < g.K; ++k) {
    for (int64_t gr = 0; gr < g.G; ++gr) {
      sc.prepare(g, off + Geometry::index5(g.os, b, gr, k, first), k);
      const T* mk = mask == nullptr ? nullptr : mask + Geometry::index4(g.ms, b, gr, k, first);
      for (int64_t i = 0; i < n; ++i) {
        T* d = dst + i * KC + k * g.C + gr * cg;
        if (!sc.corners(g, i, xb + gr * cg, nullptr, cr)) {
          std::fill(d, d + cg, T(0));
          continue;
        }
        const T m = mk == nullptr ? T(1) : mk[i * g.ms[3]];
        T w[8];
        for (int c = 0; c < 8; ++c) w[c] = cr.w[c] * m;
        const T *s0 = cr.src[0], *s1 = cr.src[1], *s2 = cr.src[2], *s3 = cr.src[3];
        const T *s4 = cr.src[4], *s5 = cr.src[5], *s6 = cr.src[6], *s7 = cr.src[7];
#pragma omp simd
        for (int64_t ch = 0; ch < cg; ++ch) {
          T acc = w[0] * s0[ch];
          acc += w[1] * s1[ch];
          acc += w[2] * s2[ch];
          acc += w[3] * s3[ch];
          acc += w[4] * s4[ch];
          acc += w[5] * s5[ch];
          acc += w[6] * s6[ch];
          acc += w[7] * s7[ch];
          d[ch] = acc;
        }
      }
    }
  }
}

template <typename T>
void columns_kernel(const Geometry& g, const T* x, const T* off, const T* mask, int64_t b, int64_t s0, int64_t s1,
                    T* cols) {
  const T* xb = x + b * g.D * g.H * g.W * g.C;
  const int64_t blocks = (s1 - s0 + kSampleBlock - 1) / kSampleBlock;
#pragma omp parallel
  {
    BlockScratch<T> sc(g.Cg);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t a = s0 + j * kSampleBlock, n = std::min(s1, a + kSampleBlock) - a;
      sample_block<T>(g, xb, off, mask, b, a, n, cols + (a - s0) * g.K * g.C, sc);
    }
  }
}

// Backward of output voxels first .. first + n - 1 of batch item b, given the gradient gcb (n, K, C) of their
// columns. GX: accumulate the input gradient into gxb (this batch item's rows); GOFF: write the offset gradient; VAL:
// compute the sampled values (for the columns, written to cols (n, K, C) when not null, or for the mask
// gradient). Kernel point by kernel point; one pass over the channels per sample serves all 8 corners and all
// three.
template <typename T, bool GX, bool GOFF, bool VAL, int CG = 0>
inline void backward_block(const Geometry& g, const T* xb, const T* off, const T* mask, const T* gcb, int64_t b,
                           int64_t first, int64_t n, T* cols_b, T* gxb, T* goff, T* gmask, BlockScratch<T>& sc) {
  Corners<T> cr;
  constexpr int L = kLanes<T>;
  const int64_t cg = CG > 0 ? CG : g.Cg, KC = g.K * g.C;
  T* val = sc.val.data();
  sc.origins(g, first, n);
  for (int64_t k = 0; k < g.K; ++k) {
    for (int64_t gr = 0; gr < g.G; ++gr) {
      sc.prepare(g, off + Geometry::index5(g.os, b, gr, k, first), k);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = first + i, e = k * g.C + gr * cg;
        const T* gc = gcb + i * KC + e;
        T* cols = cols_b == nullptr ? nullptr : cols_b + i * KC;
        const bool inside = sc.corners(g, i, xb + gr * cg, GX ? gxb + gr * cg : nullptr, cr);
        const T m = mask == nullptr ? T(1) : mask[Geometry::index4(g.ms, b, gr, k, s)];
        T gq[3] = {T(0), T(0), T(0)};
        if (inside) {
          const T *s0 = cr.src[0], *s1 = cr.src[1], *s2 = cr.src[2], *s3 = cr.src[3];
          const T *s4 = cr.src[4], *s5 = cr.src[5], *s6 = cr.src[6], *s7 = cr.src[7];
          T *d0 = cr.dst[0], *d1 = cr.dst[1], *d2 = cr.dst[2], *d3 = cr.dst[3];
          T *d4 = cr.dst[4], *d5 = cr.dst[5], *d6 = cr.dst[6], *d7 = cr.dst[7];
          T wm[8];
          for (int c = 0; c < 8; ++c) wm[c] = cr.w[c] * m;
          const T* w = cr.w;
          const T fd = cr.frac[0], fh = cr.frac[1], fw = cr.frac[2];
          // The offset gradient is gout . d(value)/d(coordinate). The value's three derivatives come from the
          // interpolation's own lerps (w, then h, then d; a corner outside reads zero, so its weight does not
          // matter), which also give the value: three sums per sample instead of one per corner. The sums run
          // lane-wise (pd / ph / pw, one vector each) and are reduced once per sample: a reduction variable in
          // the channel loop compiles to an in-order sum, one dependent scalar add per channel.
          T pd[L] = {}, ph[L] = {}, pw[L] = {};
          auto channel = [&](int64_t ch, int j) {
            const T gv = gc[ch];
            const T v0 = s0[ch], v1 = s1[ch], v2 = s2[ch], v3 = s3[ch], v4 = s4[ch], v5 = s5[ch], v6 = s6[ch],
                    v7 = s7[ch];
            if constexpr (GOFF) {
              const T e00 = v1 - v0, e01 = v3 - v2, e10 = v5 - v4, e11 = v7 - v6;  // along w, corners (d, h)
              const T p00 = v0 + fw * e00, p01 = v2 + fw * e01, p10 = v4 + fw * e10, p11 = v6 + fw * e11;
              const T h0 = p01 - p00, h1 = p11 - p10;  // along h, planes d = 0, 1
              const T q0 = p00 + fh * h0, q1 = p10 + fh * h1;
              const T r0 = e00 + fh * (e01 - e00), r1 = e10 + fh * (e11 - e10);
              pd[j] += gv * (q1 - q0);
              ph[j] += gv * (h0 + fd * (h1 - h0));
              pw[j] += gv * (r0 + fd * (r1 - r0));
              if constexpr (VAL) val[ch] = q0 + fd * (q1 - q0);
            } else if constexpr (VAL) {
              T acc = w[0] * v0;
              acc += w[1] * v1;
              acc += w[2] * v2;
              acc += w[3] * v3;
              acc += w[4] * v4;
              acc += w[5] * v5;
              acc += w[6] * v6;
              acc += w[7] * v7;
              val[ch] = acc;
            }
            if constexpr (GX) {
              d0[ch] += wm[0] * gv;
              d1[ch] += wm[1] * gv;
              d2[ch] += wm[2] * gv;
              d3[ch] += wm[3] * gv;
              d4[ch] += wm[4] * gv;
              d5[ch] += wm[5] * gv;
              d6[ch] += wm[6] * gv;
              d7[ch] += wm[7] * gv;
            }
          };
          const int64_t whole = cg - cg % L;
          for (int64_t c0 = 0; c0 < whole; c0 += L) {
#pragma omp simd
            for (int j = 0; j < L; ++j) channel(c0 + j, j);
          }
          for (int64_t ch = whole; ch < cg; ++ch) channel(ch, static_cast<int>(ch - whole));
          if constexpr (GOFF) {
            gq[0] = lane_sum<T, L>(pd);
            gq[1] = lane_sum<T, L>(ph);
            gq[2] = lane_sum<T, L>(pw);
          }
        } else if (VAL) {
          std::fill(val, val + cg, T(0));
        }
        if (goff != nullptr) {
          T* go = goff + Geometry::index5(g.gos, b, gr, k, s);
          go[0] = gq[0] * m;
          go[g.gos[3]] = gq[1] * m;
          go[2 * g.gos[3]] = gq[2] * m;
        }
        if (gmask != nullptr) {
          T dot = T(0);
          for (int64_t ch = 0; ch < cg; ++ch) dot += val[ch] * gc[ch];
          gmask[Geometry::index4(g.gms, b, gr, k, s)] = dot;
        }
        if (cols != nullptr) {
          T* dst = cols + e;
          for (int64_t ch = 0; ch < cg; ++ch) dst[ch] = val[ch] * m;
        }
      }
    }
  }
}

// Input-gradient scatter without atomics: thread 0 accumulates into gx itself, every other thread into its own
// zeroed copy of `count` entries; add_private_copies() sums them into gx, each thread a slice (call it after a
// barrier, from every thread of the region).
template <typename T>
struct PrivateGrad {
  T* gx;
  int64_t count;
  std::vector<std::vector<T>> copies;
  PrivateGrad(T* gx_, int64_t count_, int nt) : gx(gx_), count(count_), copies(gx_ == nullptr ? 0 : nt) {}
  T* mine(int tid) {
    if (gx == nullptr) return nullptr;
    if (tid == 0) return gx;
    copies[tid].assign(count, T(0));
    return copies[tid].data();
  }
  void add_private_copies(int tid, int nt) {
    if (gx == nullptr) return;
    const int64_t per = (count + nt - 1) / nt;
    const int64_t lo = std::min<int64_t>(count, tid * per), hi = std::min<int64_t>(count, lo + per);
    for (int t = 1; t < nt; ++t) {
      const T* src = copies[t].data();
      for (int64_t j = lo; j < hi; ++j) gx[j] += src[j];
    }
  }
};

// An exception must not leave an OpenMP region (std::terminate): each thread runs its work through run(), the
// first exception is kept, the remaining work is skipped, and rethrow() raises it after the region.
struct ErrorTrap {
  std::atomic<bool> failed{false};
  std::exception_ptr error = nullptr;
  template <typename F>
  void run(F&& work) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
#pragma omp critical(multicure_deform_conv_error)
      if (error == nullptr) error = std::current_exception();
      failed = true;
    }
  }
  void rethrow() const {
    if (error != nullptr) std::rethrow_exception(error);
  }
};

template <typename T, bool GX, bool GOFF, bool VAL>
void backward_kernel(const Geometry& g, const T* x, const T* off, const T* mask, const T* gcols, int64_t b,
                     int64_t s0, int64_t s1, T* cols, T* gx, T* goff, T* gmask) {
  const int64_t n = s1 - s0;
  const int64_t rows = g.D * g.H * g.W;
  const T* xb = x + b * rows * g.C;
  const int64_t blocks = (n + kSampleBlock - 1) / kSampleBlock;
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(blocks)));
  PrivateGrad<T> pg(gx == nullptr ? nullptr : gx + b * rows * g.C, rows * g.C, nt);
  ErrorTrap trap;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    T* gxb = nullptr;
    BlockScratch<T> sc(g.Cg);
    trap.run([&] { gxb = pg.mine(tid); });
#pragma omp for schedule(static)
    for (int64_t j = 0; j < blocks; ++j) {
      trap.run([&] {
        const int64_t a = j * kSampleBlock, m = std::min(n, a + kSampleBlock) - a, e = a * g.K * g.C;
        backward_block<T, GX, GOFF, VAL>(g, xb, off, mask, gcols + e, b, s0 + a, m,
                                         cols == nullptr ? nullptr : cols + e, gxb, goff, gmask, sc);
      });
    }
#pragma omp barrier
    trap.run([&] { pg.add_private_copies(tid, nt); });
  }
  trap.rethrow();
}

// dst[j * dst_ld + i] = src[i * src_ld + j] for i < rows, j < cols: one block transposed. Output rows of output
// voxels s0 .. s0 + n - 1 of batch item b are (n, C_out) blocks of a (B, S, C_out) tensor, or, when it is
// channels-first (B, C_out, S), blocks transposed through a buffer in the thread's cache: the GEMMs are faster on
// row blocks than on transposed views.
template <typename T>
void transpose_block(const T* src, int64_t rows, int64_t cols, int64_t src_ld, T* dst, int64_t dst_ld) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_ld + i] = src[i * src_ld + j];
}

// Fused forward for one weight group: the output rows (see transpose_block) are the sampled columns times wm
// (K*C, C_out), computed block by block (block output voxels per step) so that a block's columns stay in the
// thread's cache; the products run single-threaded inside the parallel region.
template <typename T, int CG>
void fused_forward_kernel(const Geometry& g, const T* x, const T* off, const T* mask, const at::Tensor& wm, T* out,
                          bool channels_first, int64_t block) {
  const int64_t KC = g.K * g.C, cout = wm.size(1);
  const int64_t per_item = (g.S + block - 1) / block, total = g.B * per_item;
  const int64_t rows = g.D * g.H * g.W;
  ErrorTrap trap;
#pragma omp parallel
  {
    at::NoGradGuard no_grad;  // grad mode is per thread: the workers' products must not see autograd either
    std::vector<T> buf, obuf;
    BlockScratch<T> sc(g.Cg);
    trap.run([&] {
      buf.resize(block * KC);
      obuf.resize(channels_first ? block * cout : 0);
    });
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t) {
      trap.run([&] {
        const int64_t b = t / per_item, s0 = (t % per_item) * block, n = std::min(g.S, s0 + block) - s0;
        const T* xb = x + b * rows * g.C;
        sample_block<T, CG>(g, xb, off, mask, b, s0, n, buf.data(), sc);
        at::Tensor cols = at::from_blob(buf.data(), {n, KC}, wm.options());
        T* out_rows = channels_first ? obuf.data() : out + (b * g.S + s0) * cout;
        at::Tensor rows_out = at::from_blob(out_rows, {n, cout}, wm.options());
        at::mm_out(rows_out, cols, wm);
        if (channels_first) transpose_block<T>(out_rows, n, cout, cout, out + b * cout * g.S + s0, g.S);
      });
    }
  }
  trap.rethrow();
}

// Fused backward for one weight group, block by block: the columns' gradient gout_rows x wm^T, then the sweep
// of backward_block (input / offset / mask gradients, recomputed columns), then the weight gradient
// columns^T x gout_rows accumulated per thread. gwm (K*C, C_out) is undefined when not needed.
template <typename T, bool GX, bool GOFF, bool VAL, int CG>
void fused_backward_kernel(const Geometry& g, const T* x, const T* off, const T* mask, const at::Tensor& wm_t,
                           const T* gout, bool channels_first, T* gx, T* goff, T* gmask, const at::Tensor& gwm,
                           int64_t block) {
  const int64_t KC = g.K * g.C, cout = wm_t.size(0);
  const int64_t per_item = (g.S + block - 1) / block, total = g.B * per_item;
  const int64_t rows = g.D * g.H * g.W;
  const bool need_w = gwm.defined();
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(total)));
  PrivateGrad<T> pg(gx, g.B * rows * g.C, nt);
  std::vector<at::Tensor> gwm_private(nt);
  ErrorTrap trap;
#pragma omp parallel num_threads(nt)
  {
    at::NoGradGuard no_grad;  // grad mode is per thread: the workers' products must not see autograd either
    const int tid = omp_get_thread_num();
    T* gxp = nullptr;
    std::vector<T> gbuf, cbuf, rbuf;
    BlockScratch<T> sc(g.Cg);
    trap.run([&] {
      gxp = pg.mine(tid);
      gbuf.resize(block * KC);
      cbuf.resize(need_w ? block * KC : 0);
      rbuf.resize(channels_first ? block * cout : 0);
      if (need_w) gwm_private[tid] = at::zeros_like(gwm);
    });
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t) {
      trap.run([&] {
        const int64_t b = t / per_item, s0 = (t % per_item) * block, n = std::min(g.S, s0 + block) - s0;
        const T* xb = x + b * rows * g.C;
        if (channels_first) transpose_block<T>(gout + b * cout * g.S + s0, cout, n, g.S, rbuf.data(), cout);
        T* gout_rows = channels_first ? rbuf.data() : const_cast<T*>(gout) + (b * g.S + s0) * cout;
        at::Tensor grows = at::from_blob(gout_rows, {n, cout}, wm_t.options());
        at::Tensor gcols = at::from_blob(gbuf.data(), {n, KC}, wm_t.options());
        at::mm_out(gcols, grows, wm_t);
        backward_block<T, GX, GOFF, VAL, CG>(g, xb, off, mask, gbuf.data(), b, s0, n,
                                             need_w ? cbuf.data() : nullptr, GX ? gxp + b * rows * g.C : nullptr,
                                             goff, gmask, sc);
        if (need_w) {
          at::Tensor cols = at::from_blob(cbuf.data(), {n, KC}, wm_t.options());
          gwm_private[tid].addmm_(cols.t(), grows);
        }
      });
    }
#pragma omp barrier
    trap.run([&] { pg.add_private_copies(tid, nt); });
  }
  trap.rethrow();
  if (need_w) {
    for (int t = 0; t < nt; ++t) gwm.add_(gwm_private[t]);
  }
}

// Calls run(GX, GOFF, VAL) with std::true_type / std::false_type tags for the runtime flags, the template
// arguments of the backward kernels; with no gradient to write the sweep still computes the values.
template <typename F>
void dispatch_flags(bool gx, bool goff, bool val, F&& run) {
  using Y = std::true_type;
  using N = std::false_type;
  if (gx && goff && val) run(Y{}, Y{}, Y{});
  else if (gx && goff) run(Y{}, Y{}, N{});
  else if (gx && val) run(Y{}, N{}, Y{});
  else if (gx) run(Y{}, N{}, N{});
  else if (goff && val) run(N{}, Y{}, Y{});
  else if (goff) run(N{}, Y{}, N{});
  else run(N{}, N{}, Y{});
}

// Calls run(std::integral_constant<int, CG>) with the channels per offset group as a compile-time constant where
// it is a common width (the channel loops then unroll into whole vectors), else with 0 (the width at run time).
template <typename F>
void dispatch_channels(int64_t cg, F&& run) {
  if (cg == 16) run(std::integral_constant<int, 16>{});
  else if (cg == 32) run(std::integral_constant<int, 32>{});
  else if (cg == 64) run(std::integral_constant<int, 64>{});
  else run(std::integral_constant<int, 0>{});
}

// Which gradients a backward call writes, after checking their buffers: grad_x a contiguous (B, D, H, W, C);
// grad_offset / grad_mask with the sizes of offset / mask and any strides (recorded in the geometry).
struct GradBuffers {
  bool x, offset, mask;
};

GradBuffers check_grad_buffers(Geometry& g, const at::Tensor& x, const at::Tensor& offset,
                               const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& grad_x,
                               const c10::optional<at::Tensor>& grad_offset,
                               const c10::optional<at::Tensor>& grad_mask) {
  auto given = [&](const c10::optional<at::Tensor>& t) -> bool {
    if (!(t.has_value() && t->defined())) return false;
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "gradient buffers must have x's dtype");
    return true;
  };
  const GradBuffers gb{given(grad_x), given(grad_offset), given(grad_mask)};
  if (gb.x) TORCH_CHECK(grad_x->is_contiguous() && grad_x->sizes() == x.sizes(), "grad_x must be contiguous like x");
  if (gb.offset) {
    TORCH_CHECK(grad_offset->sizes() == offset.sizes(), "grad_offset must have the offset's sizes");
    for (int a = 0; a < 5; ++a) g.gos[a] = grad_offset->stride(a);
  }
  if (gb.mask) {
    TORCH_CHECK(mask.has_value() && mask->defined() && grad_mask->sizes() == mask->sizes(),
                "grad_mask must have the mask's sizes");
    for (int a = 0; a < 4; ++a) g.gms[a] = grad_mask->stride(a);
  }
  return gb;
}

at::Tensor columns(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                   std::vector<int64_t> ksize, std::vector<int64_t> stride, std::vector<int64_t> padding,
                   std::vector<int64_t> dilation, std::vector<int64_t> out_size, int64_t b, int64_t s0, int64_t s1) {
  const Geometry g = make_geometry(x, offset, mask, ksize, stride, padding, dilation, out_size);
  TORCH_CHECK(0 <= b && b < g.B && 0 <= s0 && s0 <= s1 && s1 <= g.S, "chunk out of range");
  TORCH_CHECK(offset.scalar_type() == x.scalar_type(), "offset dtype must match x");
  const bool has_mask = mask.has_value() && mask->defined();
  at::Tensor cols = at::empty({s1 - s0, g.K, g.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv3d_columns", [&] {
    columns_kernel<scalar_t>(g, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                             has_mask ? mask->data_ptr<scalar_t>() : nullptr, b, s0, s1, cols.data_ptr<scalar_t>());
  });
  return cols;
}

// Backward of one chunk. Accumulates into grad_x (B, D, H, W, C) when defined, writes the chunk's entries of
// grad_offset (B, G, K, 3, S) / grad_mask (B, G, K, S) when defined, and returns the recomputed modulated
// columns (n, K, C) when need_columns (for the weight gradient), else an empty tensor.
at::Tensor backward(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                    const at::Tensor& grad_columns, std::vector<int64_t> ksize, std::vector<int64_t> stride,
                    std::vector<int64_t> padding, std::vector<int64_t> dilation, std::vector<int64_t> out_size,
                    int64_t b, int64_t s0, int64_t s1, bool need_columns, const c10::optional<at::Tensor>& grad_x,
                    const c10::optional<at::Tensor>& grad_offset, const c10::optional<at::Tensor>& grad_mask) {
  Geometry g = make_geometry(x, offset, mask, ksize, stride, padding, dilation, out_size);
  TORCH_CHECK(0 <= b && b < g.B && 0 <= s0 && s0 <= s1 && s1 <= g.S, "chunk out of range");
  TORCH_CHECK(grad_columns.is_contiguous() && grad_columns.numel() == (s1 - s0) * g.K * g.C, "bad grad_columns");
  const bool has_mask = mask.has_value() && mask->defined();
  const GradBuffers gb = check_grad_buffers(g, x, offset, mask, grad_x, grad_offset, grad_mask);
  const bool gx = gb.x, goff = gb.offset, gm = gb.mask;
  at::Tensor cols = need_columns ? at::empty({s1 - s0, g.K, g.C}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv3d_backward", [&] {
    auto run = [&](auto gx_tag, auto goff_tag, auto val_tag) {
      backward_kernel<scalar_t, decltype(gx_tag)::value, decltype(goff_tag)::value, decltype(val_tag)::value>(
          g, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), has_mask ? mask->data_ptr<scalar_t>() : nullptr,
          grad_columns.data_ptr<scalar_t>(), b, s0, s1, need_columns ? cols.data_ptr<scalar_t>() : nullptr,
          gx ? grad_x->data_ptr<scalar_t>() : nullptr, goff ? grad_offset->data_ptr<scalar_t>() : nullptr,
          gm ? grad_mask->data_ptr<scalar_t>() : nullptr);
    };
    const bool val = need_columns || gm;
    dispatch_flags(gx, goff, val, run);
  });
  return cols;
}

// Checks that t holds contiguous output rows of g, (B, S, C_out), or (B, C_out, S) when channels_first.
void check_rows(const at::Tensor& t, const Geometry& g, int64_t cout, bool channels_first, const at::Tensor& x,
                const char* name) {
  const int64_t d1 = channels_first ? cout : g.S, d2 = channels_first ? g.S : cout;
  TORCH_CHECK(t.is_contiguous() && t.dim() == 3 && t.size(0) == g.B && t.size(1) == d1 && t.size(2) == d2 &&
                  t.scalar_type() == x.scalar_type(),
              name, channels_first ? " must be a contiguous (B, C_out, S)" : " must be a contiguous (B, S, C_out)");
}

// Fused forward (one weight group): out, contiguous (B, S, C_out) rows or (B, C_out, S) when channels_first, =
// sampled columns x wm (K*C, C_out).
void fused_forward(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                   const at::Tensor& wm, std::vector<int64_t> ksize, std::vector<int64_t> stride,
                   std::vector<int64_t> padding, std::vector<int64_t> dilation, std::vector<int64_t> out_size,
                   at::Tensor& out, bool channels_first, int64_t block) {
  const Geometry g = make_geometry(x, offset, mask, ksize, stride, padding, dilation, out_size);
  TORCH_CHECK(block >= 1, "block must be >= 1");
  TORCH_CHECK(offset.scalar_type() == x.scalar_type() && wm.scalar_type() == x.scalar_type(), "dtype mismatch");
  TORCH_CHECK(wm.is_contiguous() && wm.dim() == 2 && wm.size(0) == g.K * g.C, "wm must be a contiguous (K*C, C_out)");
  check_rows(out, g, wm.size(1), channels_first, x, "out");
  const bool has_mask = mask.has_value() && mask->defined();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv3d_fused_forward", [&] {
    dispatch_channels(g.Cg, [&](auto cg_tag) {
      fused_forward_kernel<scalar_t, decltype(cg_tag)::value>(g, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                                              has_mask ? mask->data_ptr<scalar_t>() : nullptr, wm,
                                                              out.data_ptr<scalar_t>(), channels_first, block);
    });
  });
}

// Fused backward (one weight group) from the output gradient gout, laid out as fused_forward's out: accumulates
// into grad_x (B, D, H, W, C) and grad_wm (K*C, C_out), writes grad_offset / grad_mask, each when defined.
void fused_backward(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                    const at::Tensor& wm_t, const at::Tensor& gout, std::vector<int64_t> ksize,
                    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                    std::vector<int64_t> out_size, const c10::optional<at::Tensor>& grad_x,
                    const c10::optional<at::Tensor>& grad_offset, const c10::optional<at::Tensor>& grad_mask,
                    const c10::optional<at::Tensor>& grad_wm, bool channels_first, int64_t block) {
  Geometry g = make_geometry(x, offset, mask, ksize, stride, padding, dilation, out_size);
  TORCH_CHECK(block >= 1, "block must be >= 1");
  TORCH_CHECK(wm_t.is_contiguous() && wm_t.dim() == 2 && wm_t.size(1) == g.K * g.C, "wm_t must be (C_out, K*C)");
  check_rows(gout, g, wm_t.size(0), channels_first, x, "gout");
  const bool has_mask = mask.has_value() && mask->defined();
  const GradBuffers gb = check_grad_buffers(g, x, offset, mask, grad_x, grad_offset, grad_mask);
  const bool gx = gb.x, goff = gb.offset, gm = gb.mask, gw = grad_wm.has_value() && grad_wm->defined();
  if (gw) TORCH_CHECK(grad_wm->is_contiguous() && grad_wm->scalar_type() == x.scalar_type() && grad_wm->dim() == 2 &&
                          grad_wm->size(0) == g.K * g.C && grad_wm->size(1) == wm_t.size(0),
                      "grad_wm must be a contiguous (K*C, C_out)");
  const at::Tensor gwm = gw ? *grad_wm : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv3d_fused_backward", [&] {
    auto run = [&](auto gx_tag, auto goff_tag, auto val_tag) {
      dispatch_channels(g.Cg, [&](auto cg_tag) {
        fused_backward_kernel<scalar_t, decltype(gx_tag)::value, decltype(goff_tag)::value, decltype(val_tag)::value,
                              decltype(cg_tag)::value>(
            g, x.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), has_mask ? mask->data_ptr<scalar_t>() : nullptr,
            wm_t, gout.data_ptr<scalar_t>(), channels_first, gx ? grad_x->data_ptr<scalar_t>() : nullptr,
            goff ? grad_offset->data_ptr<scalar_t>() : nullptr, gm ? grad_mask->data_ptr<scalar_t>() : nullptr, gwm,
            block);
      });
    };
    const bool val = gw || gm;
    dispatch_flags(gx, goff, val, run);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("columns", &columns, "deformable 3D columns of one chunk (CPU)");
  m.def("backward", &backward, "backward of the deformable 3D columns of one chunk (CPU)");
  m.def("fused_forward", &fused_forward, "deformable 3D convolution, one weight group, columns x weights fused (CPU)");
  m.def("fused_backward", &fused_backward, "backward of fused_forward (CPU)");
}
