// BatchNorm + LeakyReLU + the decoder's output convolution (stride 1, 'same' padding, k x k, a few
// output channels) as one function, forward and backward, on channels-last x (N, H, W, C): the
// activated map y = leaky(x*a + b) is never stored, only recomputed from x where it is needed, one
// image at a time in a zero-bordered buffer that stays in cache. Built with bn_act.cpp into one
// library by vae/fast/bn_act.py.
//
// Weights are (K, k, k, C) (the conv's (K, C, k, k) with the channels last); out and g are
// (N, H, W, K). With p = k/2 and y zero outside the image:
//     out[q, o] = bias[o] + sum_{i, j, c} w[o, i, j, c] * y[q + (i - p, j - p), c]
//     dy[u, c]  = sum_{i, j, o} w[o, i, j, c] * g[u - (i - p, j - p), o]
//     dw[o, i, j, c] = sum_u y[u, c] * g[u - (i - p, j - p), o]
// and the BatchNorm's own backward as in bn_act.cpp, with gv = dy * (the LeakyReLU's slope).
#include "bn_act.h"

namespace {

using namespace bn_act;

// A zero-bordered (H + 2p, W + 2p, depth) buffer per thread; the interior is overwritten per image.
template <typename T>
struct Padded {
  long H, W, p, depth, Wp;
  std::vector<T> data;
  Padded(long H_, long W_, long p_, long depth_)
      : H(H_), W(W_), p(p_), depth(depth_), Wp(W_ + 2 * p_), data((H_ + 2 * p_) * (W_ + 2 * p_) * depth_, T(0)) {}
  T* at(long h, long w) { return data.data() + ((h + p) * Wp + (w + p)) * depth; }  // h, w: image coordinates
  // Copy an image's (H, W, depth) rows into the interior.
  void fill(const T* src) {
    for (long h = 0; h < H; ++h) {
      T* dst = at(h, 0);
      for (long j = 0; j < W * depth; ++j) dst[j] = src[h * W * depth + j];
    }
  }
};

// y of one image into the buffer's interior.
template <typename T, long CC>
void activate(const T* x, Padded<T>& y, long C_, const T* a, const T* b, T slope) {
  const long C = CC ? CC : C_;
  for (long h = 0; h < y.H; ++h)
    for (long v = 0; v < y.W; ++v) {
      T* __restrict yr = y.at(h, v);
      const T* __restrict xr = x + (h * y.W + v) * C;
#pragma omp simd
      for (long c = 0; c < C; ++c) yr[c] = leaky(xr[c] * a[c] + b[c], slope);
    }
}

// out = conv(leaky(x*a + b)): each output pixel a sum of k rows of k*C contiguous products.
template <typename T, long CC, long KK, long KS>
void forward(const T* x, T* out, long N, long H, long W, long C_, long K_, long k_, int threads, const T* a, const T* b,
             double slope, const T* w, const T* bias) {
  const long C = CC ? CC : C_, K = KK ? KK : K_, k = KS ? KS : k_;
  const long p = k / 2;
#pragma omp parallel num_threads(threads)
  {
    Padded<T> y(H, W, p, C);
    std::vector<T> partial(k * C);
    T* __restrict acc = partial.data();
#pragma omp for schedule(static)
    for (long n = 0; n < N; ++n) {
      activate<T, CC>(x + n * H * W * C, y, C, a, b, static_cast<T>(slope));
      T* on = out + n * H * W * K;
      for (long h = 0; h < H; ++h)
        for (long v = 0; v < W; ++v)
          for (long o = 0; o < K; ++o) {
            for (long j = 0; j < k * C; ++j) acc[j] = T(0);  // k*C partial sums, added up once
            for (long i = 0; i < k; ++i) {
              const T* __restrict yr = y.at(h + i - p, v - p);
              const T* __restrict wr = w + (o * k + i) * k * C;
#pragma omp simd
              for (long j = 0; j < k * C; ++j) acc[j] += wr[j] * yr[j];
            }
            T s = T(0);
#pragma omp simd reduction(+ : s)
            for (long j = 0; j < k * C; ++j) s += acc[j];
            on[(h * W + v) * K + o] = s + bias[o];
          }
    }
  }
}

// dy at image pixel (h, v) from the bordered g: sum over taps and outputs of w * g.
template <typename T, long CC, long KK, long KS>
inline void input_grad(Padded<T>& g, long h, long v, long C_, long K_, long k_, const T* w, T* __restrict dy) {
  const long C = CC ? CC : C_, K = KK ? KK : K_, k = KS ? KS : k_;
  const long p = k / 2;
  for (long c = 0; c < C; ++c) dy[c] = T(0);
  for (long i = 0; i < k; ++i)
    for (long j = 0; j < k; ++j) {
      const T* gq = g.at(h - i + p, v - j + p);
      for (long o = 0; o < K; ++o) {
        const T go = gq[o];
        const T* __restrict wr = w + ((o * k + i) * k + j) * C;
#pragma omp simd
        for (long c = 0; c < C; ++c) dy[c] += wr[c] * go;
      }
    }
}

// Pass 1: per thread, acc = (sum gv, sum gv*(x - mean)), dw_acc += the weight gradient, db_acc the bias's.
template <typename T, long CC, long KK, long KS>
void gradient_sums(const T* g, const T* x, long N, long H, long W, long C_, long K_, long k_, int threads, const T* a,
                   const T* b, T s, const double* mean, const T* w, double* acc, double* dw_acc, double* db_acc) {
  const long C = CC ? CC : C_, K = KK ? KK : K_, k = KS ? KS : k_;
  const long p = k / 2, taps = K * k * k * C;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    // The BatchNorm's sums: in registers when C is known at compile time (see channel_tiles), added
    // to this thread's acc at the end; in acc itself otherwise.
    double local1[CC ? CC : 1] = {}, local2[CC ? CC : 1] = {};
    double* __restrict s1 = CC ? local1 : acc + static_cast<size_t>(t) * 2 * C;
    double* __restrict s2 = CC ? local2 : s1 + C;
    double* __restrict dwt = dw_acc + static_cast<size_t>(t) * taps;
    double* __restrict dbt = db_acc + static_cast<size_t>(t) * K;
    Padded<T> gp(H, W, p, K);
    std::vector<T> dy(C), y(C), dw_image(taps);
#pragma omp for schedule(static)
    for (long n = 0; n < N; ++n) {
      gp.fill(g + n * H * W * K);
      for (long j = 0; j < taps; ++j) dw_image[j] = T(0);
      const T* xn = x + n * H * W * C;
      for (long h = 0; h < H; ++h)
        for (long v = 0; v < W; ++v) {
          const T* __restrict xr = xn + (h * W + v) * C;
          input_grad<T, CC, KK, KS>(gp, h, v, C, K, k, w, dy.data());
          T* __restrict yv = y.data();
#pragma omp simd
          for (long c = 0; c < C; ++c) yv[c] = leaky(xr[c] * a[c] + b[c], s);
          T* __restrict dwi = dw_image.data();
          for (long i = 0; i < k; ++i)
            for (long j = 0; j < k; ++j) {
              const T* gq = gp.at(h - i + p, v - j + p);
              for (long o = 0; o < K; ++o) {
                const T go = gq[o];
                T* __restrict dr = dwi + ((o * k + i) * k + j) * C;
#pragma omp simd
                for (long c = 0; c < C; ++c) dr[c] += yv[c] * go;
              }
            }
#pragma omp simd
          for (long c = 0; c < C; ++c) {
            T gv = dy[c] * slope_at(xr[c], a[c], b[c], s);
            s1[c] += gv;
            s2[c] += static_cast<double>(gv) * (static_cast<double>(xr[c]) - mean[c]);
          }
        }
      for (long j = 0; j < taps; ++j) dwt[j] += dw_image[j];
      const T* gn = g + n * H * W * K;
      for (long q = 0; q < H * W; ++q)
        for (long o = 0; o < K; ++o) dbt[o] += gn[q * K + o];
    }
    if (CC)
      for (long c = 0; c < C; ++c) acc[static_cast<size_t>(t) * 2 * C + c] = s1[c], acc[static_cast<size_t>(t) * 2 * C + C + c] = s2[c];
  }
}

// Pass 2: dx = a*gv + B*x + D, gv recomputed from g.
template <typename T, long CC, long KK, long KS>
void input_gradient(const T* g, const T* x, T* dx, long N, long H, long W, long C_, long K_, long k_, int threads,
                    const T* a, const T* b, T s, const T* w, const T* B, const T* D) {
  const long C = CC ? CC : C_, K = KK ? KK : K_, k = KS ? KS : k_;
  const long p = k / 2;
#pragma omp parallel num_threads(threads)
  {
    Padded<T> gp(H, W, p, K);
    std::vector<T> dy(C);
#pragma omp for schedule(static)
    for (long n = 0; n < N; ++n) {
      gp.fill(g + n * H * W * K);
      for (long h = 0; h < H; ++h)
        for (long v = 0; v < W; ++v) {
          const long off = ((n * H + h) * W + v) * C;
          const T* __restrict xr = x + off;
          T* __restrict dr = dx + off;
          input_grad<T, CC, KK, KS>(gp, h, v, C, K, k, w, dy.data());
#pragma omp simd
          for (long c = 0; c < C; ++c) dr[c] = a[c] * (dy[c] * slope_at(xr[c], a[c], b[c], s)) + B[c] * xr[c] + D[c];
        }
    }
  }
}

// The default model's last stage (32 channels, 1 output, 3x3): sizes the compiler unrolls; the
// generic instantiation (0, 0, 0) serves every other.
inline bool default_sizes(long C, long K, long k) { return C == 32 && K == 1 && k == 3; }

template <typename T>
void conv_forward(const T* x, T* out, long N, long H, long W, long C, long K, long k, int threads, const T* a,
                  const T* b, double slope, const T* w, const T* conv_bias) {
  (default_sizes(C, K, k) ? forward<T, 32, 1, 3> : forward<T, 0, 0, 0>)(x, out, N, H, W, C, K, k, threads, a, b, slope,
                                                                        w, conv_bias);
}

template <typename T>
void train_forward(const T* x, T* out, long N, long H, long W, long C, long K, long k, int threads, const T* weight,
                   const T* bias, double eps, double slope, T* running_mean, T* running_var, double factor,
                   double* mean, double* invstd, T* a, T* b, const T* w, const T* conv_bias) {
  std::vector<double> var(C);
  stats(x, N * H * W, C, 1, threads, mean, var.data());
  batch_affine(C, static_cast<double>(N) * H * W, mean, var.data(), weight, bias, eps, running_mean, running_var,
               factor, invstd, a, b);
  conv_forward(x, out, N, H, W, C, K, k, threads, a, b, slope, w, conv_bias);
}

template <typename T>
void apply(const T* x, T* out, long N, long H, long W, long C, long K, long k, int threads, const T* running_mean,
           const T* running_var, const T* weight, const T* bias, double eps, double slope, const T* w,
           const T* conv_bias) {
  std::vector<T> a(C), b(C);
  running_affine(C, running_mean, running_var, weight, bias, eps, a.data(), b.data());
  conv_forward(x, out, N, H, W, C, K, k, threads, a.data(), b.data(), slope, w, conv_bias);
}

template <typename T>
void backward(const T* g, const T* x, T* dx, long N, long H, long W, long C, long K, long k, int threads, const T* a,
              const T* b, double slope, const double* mean, const double* invstd, const T* w, T* dweight, T* dbias,
              T* dw, T* dconv_bias) {
  const T s = static_cast<T>(slope);
  const long taps = K * k * k * C;
  std::vector<double> acc(static_cast<size_t>(threads) * 2 * C, 0.0), dw_acc(static_cast<size_t>(threads) * taps, 0.0),
      db_acc(static_cast<size_t>(threads) * K, 0.0);
  const bool unrolled = default_sizes(C, K, k);
  (unrolled ? gradient_sums<T, 32, 1, 3> : gradient_sums<T, 0, 0, 0>)(g, x, N, H, W, C, K, k, threads, a, b, s, mean,
                                                                    w, acc.data(), dw_acc.data(), db_acc.data());
  for (long j = 0; j < taps; ++j) dw[j] = static_cast<T>(thread_sum(dw_acc.data(), threads, taps, j));
  for (long o = 0; o < K; ++o) dconv_bias[o] = static_cast<T>(thread_sum(db_acc.data(), threads, K, o));
  std::vector<T> B(C), D(C);
  gradient_coefficients(acc.data(), threads, C, static_cast<double>(N) * H * W, a, mean, invstd, dweight, dbias,
                        B.data(), D.data());
  (unrolled ? input_gradient<T, 32, 1, 3> : input_gradient<T, 0, 0, 0>)(g, x, dx, N, H, W, C, K, k, threads, a, b, s,
                                                                      w, B.data(), D.data());
}

}  // namespace

#define BN_ACT_CONV_ENTRY_POINTS(T, SUFFIX)                                                                        \
  void bn_act_conv_forward_##SUFFIX(const T* x, T* out, long N, long H, long W, long C, long K, long k,           \
                                    int threads, const T* weight, const T* bias, double eps, double slope,        \
                                    T* running_mean, T* running_var, double factor, double* mean, double* invstd, \
                                    T* a, T* b, const T* w, const T* conv_bias) {                                 \
    train_forward(x, out, N, H, W, C, K, k, threads, weight, bias, eps, slope, running_mean, running_var, factor, \
                  mean, invstd, a, b, w, conv_bias);                                                              \
  }                                                                                                               \
  void bn_act_conv_apply_##SUFFIX(const T* x, T* out, long N, long H, long W, long C, long K, long k, int threads, \
                                  const T* running_mean, const T* running_var, const T* weight, const T* bias,    \
                                  double eps, double slope, const T* w, const T* conv_bias) {                     \
    apply(x, out, N, H, W, C, K, k, threads, running_mean, running_var, weight, bias, eps, slope, w, conv_bias);  \
  }                                                                                                               \
  void bn_act_conv_backward_##SUFFIX(const T* g, const T* x, T* dx, long N, long H, long W, long C, long K,       \
                                     long k, int threads, const T* a, const T* b, double slope,                   \
                                     const double* mean, const double* invstd, const T* w, T* dweight, T* dbias,  \
                                     T* dw, T* dconv_bias) {                                                      \
    backward(g, x, dx, N, H, W, C, K, k, threads, a, b, slope, mean, invstd, w, dweight, dbias, dw, dconv_bias);  \
  }

extern "C" {
BN_ACT_CONV_ENTRY_POINTS(float, f32)
BN_ACT_CONV_ENTRY_POINTS(double, f64)
}
