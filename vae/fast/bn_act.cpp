// BatchNorm (training statistics) followed by LeakyReLU, forward and backward, in two passes over
// memory each instead of the five that the separate PyTorch ops make. Built by vae/fast/bn_act.py
// (g++ -O3 -fopenmp, linked to the libgomp that torch has already loaded), called through ctypes.
//
// A tensor (N, C, H, W) is seen as (O, C, I): element (o, c, i) at o*C*I + c*I + i. Channels-last
// memory is O = N*H*W, I = 1 (rows of C channels); contiguous memory is O = N, I = H*W (planes).
// Sums are accumulated in double, per thread, then added up. With a = gamma*invstd and b = beta - mean*a, the forward is
//     y = leaky(x*a + b)
// and the backward, with gv = dL/dv (the LeakyReLU's slope applied), xhat = (x - mean)*invstd:
//     dbeta = sum gv,  dgamma = sum gv*xhat,
//     dx = a*(gv - dbeta/n - xhat*dgamma/n)  =  a*gv + B*x + D   (B, D per channel).
#include "bn_act.h"

namespace {

using namespace bn_act;

// y = leaky(x*a + b), a and b per channel.
template <typename T>
void affine_leaky(const T* x, T* y, long O, long C, long I, int threads, const T* a, const T* b, T slope) {
  if (I == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long o = 0; o < O; ++o) {
      const T* __restrict xr = x + o * C;
      T* __restrict yr = y + o * C;
#pragma omp simd
      for (long c = 0; c < C; ++c) {
        T v = xr[c] * a[c] + b[c];
        yr[c] = leaky(v, slope);
      }
    }
  } else {
#pragma omp parallel for schedule(static) collapse(2) num_threads(threads)
    for (long o = 0; o < O; ++o)
      for (long c = 0; c < C; ++c) {
        const T* __restrict xp = x + (o * C + c) * I;
        T* __restrict yp = y + (o * C + c) * I;
        T ac = a[c], bc = b[c];
#pragma omp simd
        for (long i = 0; i < I; ++i) {
          T v = xp[i] * ac + bc;
          yp[i] = leaky(v, slope);
        }
      }
  }
}

// Training: the batch's statistics, a and b, the running statistics (when given), then y.
template <typename T>
void forward(const T* x, T* y, long O, long C, long I, int threads, const T* weight, const T* bias, double eps,
             double slope, T* running_mean, T* running_var, double factor, double* mean, double* invstd, T* a,
             T* b) {
  std::vector<double> var(C);
  stats(x, O, C, I, threads, mean, var.data());
  batch_affine(C, static_cast<double>(O) * I, mean, var.data(), weight, bias, eps, running_mean, running_var, factor,
               invstd, a, b);
  affine_leaky(x, y, O, C, I, threads, a, b, static_cast<T>(slope));
}

// Evaluation: the running statistics, one pass.
template <typename T>
void apply(const T* x, T* y, long O, long C, long I, int threads, const T* running_mean, const T* running_var,
           const T* weight, const T* bias, double eps, double slope) {
  std::vector<T> a(C), b(C);
  running_affine(C, running_mean, running_var, weight, bias, eps, a.data(), b.data());
  affine_leaky(x, y, O, C, I, threads, a.data(), b.data(), static_cast<T>(slope));
}

// Inside a parallel region: this thread's rows of channels [c0, c0 + W) (channel_tiles),
// s1 += gv and s2 += gv*(x - mean).
template <typename T, int W>
void tile_gradient_sums(const T* g, const T* x, long O, long C, long c0, const T* a, const T* b, T s,
                        const double* mean, double* s1, double* s2) {
  double a1[W] = {}, a2[W] = {}, m[W];
  T ac[W], bc[W];
  for (int j = 0; j < W; ++j) m[j] = mean[c0 + j], ac[j] = a[c0 + j], bc[j] = b[c0 + j];
#pragma omp for schedule(static) nowait
  for (long o = 0; o < O; ++o) {
    const T* __restrict xr = x + o * C + c0;
    const T* __restrict gr = g + o * C + c0;
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      T gv = gr[j] * slope_at(xr[j], ac[j], bc[j], s);
      a1[j] += gv;
      a2[j] += static_cast<double>(gv) * (static_cast<double>(xr[j]) - m[j]);
    }
  }
  for (int j = 0; j < W; ++j) {
    s1[c0 + j] += a1[j];
    s2[c0 + j] += a2[j];
  }
}

// Pass 1 of the backward: acc[t][c] += gv and acc[t][C + c] += gv*(x - mean) per thread t.
template <typename T>
void gradient_sums(const T* g, const T* x, long O, long C, long I, int threads, const T* a, const T* b, T s,
                   const double* mean, double* acc) {
#pragma omp parallel num_threads(threads)
  {
    double* __restrict s1 = acc + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
    double* __restrict s2 = s1 + C;
    if (I == 1) {
      channel_tiles(C, [&](auto width, long c0) {
        tile_gradient_sums<T, decltype(width)::value>(g, x, O, C, c0, a, b, s, mean, s1, s2);
      });
    } else {
#pragma omp for schedule(static) collapse(2)
      for (long o = 0; o < O; ++o)
        for (long c = 0; c < C; ++c) {
          const T* __restrict xp = x + (o * C + c) * I;
          const T* __restrict gp = g + (o * C + c) * I;
          T ac = a[c], bc = b[c];
          double mc = mean[c], a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+ : a1, a2)
          for (long i = 0; i < I; ++i) {
            T gv = gp[i] * slope_at(xp[i], ac, bc, s);
            a1 += gv;
            a2 += static_cast<double>(gv) * (static_cast<double>(xp[i]) - mc);
          }
          s1[c] += a1;
          s2[c] += a2;
        }
    }
  }
}

// Pass 2: dx = a*gv + B*x + D.
template <typename T>
void input_gradient(const T* g, const T* x, T* dx, long O, long C, long I, int threads, const T* a, const T* b,
                    T s, const T* B, const T* D) {
  if (I == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long o = 0; o < O; ++o) {
      const T* __restrict xr = x + o * C;
      const T* __restrict gr = g + o * C;
      T* __restrict dr = dx + o * C;
#pragma omp simd
      for (long c = 0; c < C; ++c) dr[c] = a[c] * (gr[c] * slope_at(xr[c], a[c], b[c], s)) + B[c] * xr[c] + D[c];
    }
  } else {
#pragma omp parallel for schedule(static) collapse(2) num_threads(threads)
    for (long o = 0; o < O; ++o)
      for (long c = 0; c < C; ++c) {
        const T* __restrict xp = x + (o * C + c) * I;
        const T* __restrict gp = g + (o * C + c) * I;
        T* __restrict dp = dx + (o * C + c) * I;
        T ac = a[c], bc = b[c], Bc = B[c], Dc = D[c];
#pragma omp simd
        for (long i = 0; i < I; ++i) dp[i] = ac * (gp[i] * slope_at(xp[i], ac, bc, s)) + Bc * xp[i] + Dc;
      }
  }
}

// dx, dweight = sum gv*xhat and dbias = sum gv.
template <typename T>
void backward(const T* g, const T* x, T* dx, long O, long C, long I, int threads, const T* a, const T* b,
              double slope, const double* mean, const double* invstd, T* dweight, T* dbias) {
  const T s = static_cast<T>(slope);
  std::vector<double> acc(static_cast<size_t>(threads) * 2 * C, 0.0);
  gradient_sums(g, x, O, C, I, threads, a, b, s, mean, acc.data());
  std::vector<T> B(C), D(C);
  gradient_coefficients(acc.data(), threads, C, static_cast<double>(O) * I, a, mean, invstd, dweight, dbias, B.data(),
                        D.data());
  input_gradient(g, x, dx, O, C, I, threads, a, b, s, B.data(), D.data());
}

}  // namespace

// The entry points bn_act.py calls, for float (f32) and double (f64) tensors.
#define BN_ACT_ENTRY_POINTS(T, SUFFIX)                                                                     \
  void bn_act_forward_##SUFFIX(const T* x, T* y, long O, long C, long I, int threads, const T* weight,   \
                               const T* bias, double eps, double slope, T* running_mean, T* running_var, \
                               double factor, double* mean, double* invstd, T* a, T* b) {                \
    forward(x, y, O, C, I, threads, weight, bias, eps, slope, running_mean, running_var, factor, mean,  \
            invstd, a, b);                                                                               \
  }                                                                                                      \
  void bn_act_apply_##SUFFIX(const T* x, T* y, long O, long C, long I, int threads, const T* running_mean, \
                             const T* running_var, const T* weight, const T* bias, double eps,           \
                             double slope) {                                                             \
    apply(x, y, O, C, I, threads, running_mean, running_var, weight, bias, eps, slope);                 \
  }                                                                                                      \
  void bn_act_backward_##SUFFIX(const T* g, const T* x, T* dx, long O, long C, long I, int threads,       \
                                const T* a, const T* b, double slope, const double* mean,                \
                                const double* invstd, T* dweight, T* dbias) {                            \
    backward(g, x, dx, O, C, I, threads, a, b, slope, mean, invstd, dweight, dbias);                     \
  }

extern "C" {
BN_ACT_ENTRY_POINTS(float, f32)
BN_ACT_ENTRY_POINTS(double, f64)
}
