// Fused CPU sampling kernels of the 3D deformable convolution (multicure_monai.networks.deform_conv).
//
// The Python side keeps the chunk loop, the GEMMs and autograd; these kernels replace the per-chunk
// trilinear gather (forward) and the gather / scatter / coordinate-gradient passes (backward) of the pure
// PyTorch "gather" implementation with one loop nest each, parallel over output voxels (OpenMP, the runtime
// PyTorch itself uses). They compute exactly the same function: zero padding, a sample whose coordinate lies
// outside (-1, size) on any axis reads zero, every corner outside the volume contributes zero.
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

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t B, C, D, H, W, G, Cg, K;
  int64_t stride[3], padding[3];  // per axis (D, H, W)
  int64_t Ho, Wo, S;              // output height, width, number of voxels
  std::vector<int64_t> kdisp;     // (K, 3) displacement of every kernel point from the window origin
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& offset, std::vector<int64_t> ksize,
                       std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                       std::vector<int64_t> out_size) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous(), "x must be a contiguous (B, D, H, W, C) tensor");
  TORCH_CHECK(offset.dim() == 5 && offset.is_contiguous(), "offset must be a contiguous (B, G, K, 3, S) tensor");
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
  TORCH_CHECK(offset.size(0) == g.B && offset.size(3) == 3 && offset.size(4) == g.S, "offset shape mismatch");
  return g;
}

// The 8 trilinear corners of a sample: voxel row indices (into one batch item's D*H*W rows), weights and,
// optionally, the derivatives of the weights w.r.t. the three coordinates. Returns false when the sample
// reads zero (outside (-1, size) on some axis); corners outside the volume get weight and derivatives 0.
template <typename T>
inline bool trilinear_corners(const Geometry& g, T qd, T qh, T qw, int64_t* row, T* w, T* wd, T* wh, T* ww) {
  if (!(qd > T(-1) && qd < T(g.D) && qh > T(-1) && qh < T(g.H) && qw > T(-1) && qw < T(g.W))) return false;
  const T fd = std::floor(qd), fh = std::floor(qh), fw = std::floor(qw);
  const int64_t id = static_cast<int64_t>(fd), ih = static_cast<int64_t>(fh), iw = static_cast<int64_t>(fw);
  const T td = qd - fd, th = qh - fh, tw = qw - fw;
  const T ad[2] = {T(1) - td, td}, ah[2] = {T(1) - th, th}, aw[2] = {T(1) - tw, tw};
  const T sgn[2] = {T(-1), T(1)};
  int c = 0;
  for (int a = 0; a < 2; ++a) {
    const int64_t d = id + a;
    const bool vd = d >= 0 && d < g.D;
    for (int b = 0; b < 2; ++b) {
      const int64_t h = ih + b;
      const bool vh = h >= 0 && h < g.H;
      for (int e = 0; e < 2; ++e, ++c) {
        const int64_t x = iw + e;
        if (!(vd && vh && x >= 0 && x < g.W)) {
          row[c] = -1;
          w[c] = T(0);
          if (wd != nullptr) wd[c] = wh[c] = ww[c] = T(0);
          continue;
        }
        row[c] = (d * g.H + h) * g.W + x;
        w[c] = ad[a] * ah[b] * aw[e];
        if (wd != nullptr) {
          wd[c] = sgn[a] * ah[b] * aw[e];
          wh[c] = ad[a] * sgn[b] * aw[e];
          ww[c] = ad[a] * ah[b] * sgn[e];
        }
      }
    }
  }
  return true;
}

// Window origin of output voxel s per axis; kernel point k samples at origin + kdisp[k] + offset.
inline void window_origin(const Geometry& g, int64_t s, int64_t* o) {
  const int64_t pos[3] = {s / (g.Ho * g.Wo), (s / g.Wo) % g.Ho, s % g.Wo};
  for (int a = 0; a < 3; ++a) o[a] = pos[a] * g.stride[a] - g.padding[a];
}

template <typename T>
void columns_kernel(const Geometry& g, const T* x, const T* off, const T* mask, int64_t b, int64_t s0, int64_t s1,
                    T* cols) {
  const int64_t n = s1 - s0;
  const T* xb = x + b * g.D * g.H * g.W * g.C;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = s0 + i;
    int64_t row[8];
    T w[8];
    int64_t o3[3];
    window_origin(g, s, o3);
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t* kd = &g.kdisp[3 * k];
      const int64_t p[3] = {o3[0] + kd[0], o3[1] + kd[1], o3[2] + kd[2]};
      for (int64_t gr = 0; gr < g.G; ++gr) {
        T* dst = cols + (i * g.K + k) * g.C + gr * g.Cg;
        std::fill(dst, dst + g.Cg, T(0));
        const T* o = off + (((b * g.G + gr) * g.K + k) * 3) * g.S + s;
        if (!trilinear_corners<T>(g, T(p[0]) + o[0], T(p[1]) + o[g.S], T(p[2]) + o[2 * g.S], row, w,
                                  (T*)nullptr, (T*)nullptr, (T*)nullptr))
          continue;
        const T m = mask == nullptr ? T(1) : mask[((b * g.G + gr) * g.K + k) * g.S + s];
        for (int c = 0; c < 8; ++c) {
          if (row[c] < 0) continue;
          const T wc = w[c] * m;
          const T* src = xb + row[c] * g.C + gr * g.Cg;
#pragma omp simd
          for (int64_t ch = 0; ch < g.Cg; ++ch) dst[ch] += wc * src[ch];
        }
      }
    }
  }
}

// GX: accumulate the input gradient; GOFF: offset gradient; VAL: the sampled values (for the columns or the
// mask gradient). One sweep over the 8 corners of every sample reads each input row once for all three.
template <typename T, bool GX, bool GOFF, bool VAL>
void backward_kernel(const Geometry& g, const T* x, const T* off, const T* mask, const T* gcols, int64_t b,
                     int64_t s0, int64_t s1, T* cols, T* gx, T* goff, T* gmask) {
  const int64_t n = s1 - s0;
  const int64_t rows = g.D * g.H * g.W;
  const T* xb = x + b * rows * g.C;
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(n)));
  // thread 0 scatters into the input gradient itself, every other thread into its own zeroed copy (no
  // atomics); the copies are added at the end
  std::vector<std::vector<T>> priv(gx == nullptr ? 0 : nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    T* gxb = nullptr;
    if (gx != nullptr) {
      if (tid == 0) {
        gxb = gx + b * rows * g.C;
      } else {
        priv[tid].assign(rows * g.C, T(0));
        gxb = priv[tid].data();
      }
    }
    std::vector<T> val(g.Cg);
    int64_t row[8];
    T w[8], wd[8], wh[8], ww[8];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = s0 + i;
      int64_t o3[3];
      window_origin(g, s, o3);
      for (int64_t k = 0; k < g.K; ++k) {
        const int64_t* kd = &g.kdisp[3 * k];
        const int64_t p[3] = {o3[0] + kd[0], o3[1] + kd[1], o3[2] + kd[2]};
        for (int64_t gr = 0; gr < g.G; ++gr) {
          const int64_t e = (i * g.K + k) * g.C + gr * g.Cg;
          const T* gc = gcols + e;
          const int64_t oi = (((b * g.G + gr) * g.K + k) * 3) * g.S + s;
          const int64_t mi = ((b * g.G + gr) * g.K + k) * g.S + s;
          const T* o = off + oi;
          const bool inside = trilinear_corners<T>(g, T(p[0]) + o[0], T(p[1]) + o[g.S], T(p[2]) + o[2 * g.S],
                                                   row, w, GOFF ? wd : nullptr, wh, ww);
          const T m = mask == nullptr ? T(1) : mask[mi];
          T gq[3] = {T(0), T(0), T(0)};
          T* vv = val.data();
          if (VAL) std::fill(val.begin(), val.end(), T(0));
          if (inside) {
            for (int c = 0; c < 8; ++c) {
              if (row[c] < 0) continue;
              const T* src = xb + row[c] * g.C + gr * g.Cg;
              T* dst = GX ? gxb + row[c] * g.C + gr * g.Cg : nullptr;
              const T wc = w[c], wm = wc * m;
              T dot = T(0);
#pragma omp simd reduction(+ : dot)
              for (int64_t ch = 0; ch < g.Cg; ++ch) {
                const T sv = src[ch], gv = gc[ch];
                if constexpr (GOFF) dot += sv * gv;
                if constexpr (VAL) vv[ch] += wc * sv;
                if constexpr (GX) dst[ch] += wm * gv;
              }
              if constexpr (GOFF) {
                gq[0] += wd[c] * dot;
                gq[1] += wh[c] * dot;
                gq[2] += ww[c] * dot;
              }
            }
          }
          if (goff != nullptr) {
            goff[oi] = gq[0] * m;
            goff[oi + g.S] = gq[1] * m;
            goff[oi + 2 * g.S] = gq[2] * m;
          }
          if (gmask != nullptr) {
            T dot = T(0);
            for (int64_t ch = 0; ch < g.Cg; ++ch) dot += val[ch] * gc[ch];
            gmask[mi] = dot;
          }
          if (cols != nullptr) {
            T* dst = cols + e;
            for (int64_t ch = 0; ch < g.Cg; ++ch) dst[ch] = val[ch] * m;
          }
        }
      }
    }
    if (gx != nullptr) {
#pragma omp barrier
      // sum the private copies, each thread a slice of the rows
      T* out = gx + b * rows * g.C;
      const int64_t total = rows * g.C;
      const int64_t per = (total + nt - 1) / nt;
      const int64_t lo = std::min<int64_t>(total, tid * per), hi = std::min<int64_t>(total, lo + per);
      for (int t = 1; t < nt; ++t) {
        const T* src = priv[t].data();
        for (int64_t j = lo; j < hi; ++j) out[j] += src[j];
      }
    }
  }
}

at::Tensor columns(const at::Tensor& x, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                   std::vector<int64_t> ksize, std::vector<int64_t> stride, std::vector<int64_t> padding,
                   std::vector<int64_t> dilation, std::vector<int64_t> out_size, int64_t b, int64_t s0, int64_t s1) {
  const Geometry g = make_geometry(x, offset, ksize, stride, padding, dilation, out_size);
  TORCH_CHECK(0 <= b && b < g.B && 0 <= s0 && s0 <= s1 && s1 <= g.S, "chunk out of range");
  TORCH_CHECK(offset.scalar_type() == x.scalar_type(), "offset dtype must match x");
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) TORCH_CHECK(mask->is_contiguous() && mask->scalar_type() == x.scalar_type(), "bad mask");
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
  const Geometry g = make_geometry(x, offset, ksize, stride, padding, dilation, out_size);
  TORCH_CHECK(0 <= b && b < g.B && 0 <= s0 && s0 <= s1 && s1 <= g.S, "chunk out of range");
  TORCH_CHECK(grad_columns.is_contiguous() && grad_columns.numel() == (s1 - s0) * g.K * g.C, "bad grad_columns");
  const bool has_mask = mask.has_value() && mask->defined();
  auto opt_ptr = [&](const c10::optional<at::Tensor>& t, const at::Tensor& like) -> bool {
    if (!(t.has_value() && t->defined())) return false;
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == like.scalar_type(), "gradient buffers must be contiguous");
    return true;
  };
  const bool gx = opt_ptr(grad_x, x), goff = opt_ptr(grad_offset, x), gm = opt_ptr(grad_mask, x);
  if (gx) TORCH_CHECK(grad_x->sizes() == x.sizes(), "grad_x shape mismatch");
  if (goff) TORCH_CHECK(grad_offset->sizes() == offset.sizes(), "grad_offset shape mismatch");
  if (gm) TORCH_CHECK(has_mask && grad_mask->sizes() == mask->sizes(), "grad_mask shape mismatch");
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
    using Y = std::true_type;
    using N = std::false_type;
    if (gx && goff && val) run(Y{}, Y{}, Y{});
    else if (gx && goff) run(Y{}, Y{}, N{});
    else if (gx && val) run(Y{}, N{}, Y{});
    else if (gx) run(Y{}, N{}, N{});
    else if (goff && val) run(N{}, Y{}, Y{});
    else if (goff) run(N{}, Y{}, N{});
    else run(N{}, N{}, Y{});
  });
  return cols;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("columns", &columns, "deformable 3D columns of one chunk (CPU)");
  m.def("backward", &backward, "backward of the deformable 3D columns of one chunk (CPU)");
}
