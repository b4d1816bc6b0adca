// Shared by bn_act.cpp and bn_act_conv.cpp: the batch statistics, the per-channel affine form of
// BatchNorm (a = gamma*invstd, b = beta - mean*a) and the coefficients of its input gradient.
#pragma once
#include <omp.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace bn_act {

// y = leaky(v): v, or v*slope below 0 (a select with -fno-trapping-math, not a branch).
template <typename T>
inline T leaky(T v, T slope) { return v > T(0) ? v : v * slope; }

// sum over threads t of acc[t*stride + j]: the per-thread partial sums of one value.
inline double thread_sum(const double* acc, int threads, size_t stride, size_t j) {
  double sum = 0.0;
  for (int t = 0; t < threads; ++t) sum += acc[static_cast<size_t>(t) * stride + j];
  return sum;
}

// Each pass is one loop over memory: rows of C channels (channels-last) or planes of I values
// (contiguous), split over the threads, the inner loop vectorised ("omp simd").
//
// A sum over the rows of channels-last memory runs tile by tile: f(W, c0) sums channels
// [c0, c0 + W) with W known at compile time, so the W running sums stay in registers. Summed into
// an array of runtime length instead, each row waited on the previous row's stores (4-5x slower
// at 32 channels, Intel Xeon). Each tile's sweep gives a thread the same rows (a static schedule
// over the same count), so every sum adds the same values in the same order.
template <typename F>
void channel_tiles(long C, F&& f) {
  long c0 = 0;
  auto take = [&](auto width) {
    for (; c0 + decltype(width)::value <= C; c0 += decltype(width)::value) f(width, c0);
  };
  take(std::integral_constant<int, 32>{});
  take(std::integral_constant<int, 16>{});
  take(std::integral_constant<int, 8>{});
  take(std::integral_constant<int, 4>{});
  take(std::integral_constant<int, 2>{});
  take(std::integral_constant<int, 1>{});
}

// Inside a parallel region: this thread's rows of channels [c0, c0 + W), s1 += sum d, s2 += sum d^2
// with d = x - shift.
template <typename T, int W>
void tile_stats(const T* x, long O, long C, long c0, const double* shift, double* s1, double* s2) {
  double a1[W] = {}, a2[W] = {}, origin[W];
  for (int j = 0; j < W; ++j) origin[j] = shift[c0 + j];
#pragma omp for schedule(static) nowait
  for (long o = 0; o < O; ++o) {
    const T* __restrict row = x + o * C + c0;
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      double d = static_cast<double>(row[j]) - origin[j];
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  for (int j = 0; j < W; ++j) {
    s1[c0 + j] += a1[j];
    s2[c0 + j] += a2[j];
  }
}

// mean[c] and the biased variance var[c] of x, from sums shifted by each channel's first value
// (shifting keeps sum(d^2) - sum(d)^2/n from cancelling when |mean| >> std).
template <typename T>
void stats(const T* x, long O, long C, long I, int threads, double* mean, double* var) {
  std::vector<double> shift(C), acc(static_cast<size_t>(threads) * 2 * C, 0.0);
  for (long c = 0; c < C; ++c) shift[c] = x[c * I];
#pragma omp parallel num_threads(threads)
  {
    double* __restrict s1 = acc.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
    double* __restrict s2 = s1 + C;
    const double* __restrict sh = shift.data();
    if (I == 1) {
      channel_tiles(C, [&](auto width, long c0) { tile_stats<T, decltype(width)::value>(x, O, C, c0, sh, s1, s2); });
    } else {
#pragma omp for schedule(static) collapse(2)
      for (long o = 0; o < O; ++o)
        for (long c = 0; c < C; ++c) {
          const T* __restrict plane = x + (o * C + c) * I;
          double origin = sh[c], a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+ : a1, a2)
          for (long i = 0; i < I; ++i) {
            double d = static_cast<double>(plane[i]) - origin;
            a1 += d;
            a2 += d * d;
          }
          s1[c] += a1;
          s2[c] += a2;
        }
    }
  }
  double n = static_cast<double>(O) * I;
  for (long c = 0; c < C; ++c) {
    double s1 = thread_sum(acc.data(), threads, 2 * C, c), s2 = thread_sum(acc.data(), threads, 2 * C, C + c);
    double m = s1 / n;
    mean[c] = shift[c] + m;
    var[c] = std::fmax(s2 / n - m * m, 0.0);
  }
}

// invstd, a and b from the batch's mean and biased variance; the running statistics updated
// (unbiased variance) when given, as nn.BatchNorm2d does.
template <typename T>
void batch_affine(long C, double n, const double* mean, const double* var, const T* weight, const T* bias, double eps,
                  T* running_mean, T* running_var, double factor, double* invstd, T* a, T* b) {
  for (long c = 0; c < C; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    a[c] = static_cast<T>(weight[c] * invstd[c]);
    b[c] = static_cast<T>(bias[c] - mean[c] * a[c]);
    if (running_mean != nullptr) {
      running_mean[c] = static_cast<T>((1.0 - factor) * running_mean[c] + factor * mean[c]);
      running_var[c] = static_cast<T>((1.0 - factor) * running_var[c] + factor * var[c] * n / (n - 1.0));
    }
  }
}

// a and b from the running statistics (evaluation).
template <typename T>
void running_affine(long C, const T* running_mean, const T* running_var, const T* weight, const T* bias, double eps,
                    T* a, T* b) {
  for (long c = 0; c < C; ++c) {
    double scale = weight[c] / std::sqrt(static_cast<double>(running_var[c]) + eps);
    a[c] = static_cast<T>(scale);
    b[c] = static_cast<T>(bias[c] - running_mean[c] * scale);
  }
}

// The LeakyReLU's gradient factor at x (the forward's own x*a + b): a select, not a branch.
template <typename T>
inline T slope_at(T x, T a, T b, T slope) { return x * a + b > T(0) ? T(1) : slope; }

// From the per-thread sums acc[t] = (sum gv, sum gv*(x - mean)): dweight, dbias and the
// coefficients of dx = a*gv + B*x + D.
template <typename T>
void gradient_coefficients(const double* acc, int threads, long C, double n, const T* a, const double* mean,
                           const double* invstd, T* dweight, T* dbias, T* B, T* D) {
  for (long c = 0; c < C; ++c) {
    double sum_gv = thread_sum(acc, threads, 2 * C, c), sum_gv_xc = thread_sum(acc, threads, 2 * C, C + c);
    double mean_gv = sum_gv / n, mean_gv_xhat = sum_gv_xc * invstd[c] / n;
    dbias[c] = static_cast<T>(sum_gv);
    dweight[c] = static_cast<T>(sum_gv_xc * invstd[c]);
    B[c] = static_cast<T>(-a[c] * mean_gv_xhat * invstd[c]);
    D[c] = static_cast<T>(a[c] * (mean[c] * mean_gv_xhat * invstd[c] - mean_gv));
  }
}

}  // namespace bn_act
