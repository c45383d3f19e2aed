// CUDA multi-scale nearest-point rasterizer and feature gather for npbgpp_core.
//
// Bit-exact contract with npbgpp_core.rasterizer.rasterize_keys_torch: every float32
// operation below is an explicitly rounded intrinsic (__fmul_rn/__fadd_rn/__fdiv_rn) in
// the reference's order, so neither FMA contraction nor fast division can change a
// result (the build also passes -fmad=false as a second guard).
#include "rasterizer_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace npbgpp {
namespace {

constexpr int kThreads = 256;

int blocks_for(long long work, int max_blocks) {
  long long blocks = (work + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks);
}

__device__ __forceinline__ long long grid_start() {
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
  return static_cast<long long>(gridDim.x) * blockDim.x;
}

// x*r0 + y*r1 + z*r2 + t, left to right, each op rounded to float32 (as torch does it).
__device__ __forceinline__ float dot_plus(float x, float y, float z, float r0, float r1, float r2,
                                          float t) {
  float acc = __fadd_rn(__fmul_rn(x, r0), __fmul_rn(y, r1));
  acc = __fadd_rn(acc, __fmul_rn(z, r2));
  return __fadd_rn(acc, t);
}

__global__ void rasterize_points_kernel(const float* __restrict__ points, long long n,
                                        long long index_offset, const float* __restrict__ rotation,
                                        const float* __restrict__ translation, ProjectionParams p,
                                        KeyImages images) {
  // R is row-major (3,3): x_view = x_world @ R + T, so column j of R makes view axis j.
  const float r00 = rotation[0], r01 = rotation[1], r02 = rotation[2];
  const float r10 = rotation[3], r11 = rotation[4], r12 = rotation[5];
  const float r20 = rotation[6], r21 = rotation[7], r22 = rotation[8];
  const float t0 = translation[0], t1 = translation[1], t2 = translation[2];
  for (long long i = grid_start(); i < n; i += grid_stride()) {
    const float x = points[3 * i], y = points[3 * i + 1], z = points[3 * i + 2];
    const float xv = dot_plus(x, y, z, r00, r10, r20, t0);
    const float yv = dot_plus(x, y, z, r01, r11, r21, t1);
    const float zv = dot_plus(x, y, z, r02, r12, r22, t2);
    const float u = __fadd_rn(__fmul_rn(__fdiv_rn(-xv, zv), p.fx), p.cx);
    const float v = __fadd_rn(__fmul_rn(__fdiv_rn(-yv, zv), p.fy), p.cy);
    if (!(isfinite(u) && isfinite(v) && zv > p.near_depth)) continue;
    const float qx = __fdiv_rn(__fadd_rn(u, 0.5f), p.width);
    const float qy = __fdiv_rn(__fadd_rn(v, 0.5f), p.height);
    // zv > near >= 0, so its bits are a non-negative int32 ordered like the depths.
    const long long key = (static_cast<long long>(__float_as_int(zv)) << 32) | (index_offset + i);
    for (int s = 0; s < images.count; ++s) {
      const KeyImage img = images.image[s];
      const float w = static_cast<float>(img.width);
      const float h = static_cast<float>(img.height);
      const float col = floorf(__fmul_rn(qx, w));
      const float row = floorf(__fmul_rn(qy, h));
      if (!(col >= 0.0f && col < w && row >= 0.0f && row < h)) continue;
      long long* slot =
          img.keys + static_cast<long long>(row) * img.width + static_cast<long long>(col);
      // Keys only ever decrease, so a (possibly stale) value <= key means nothing to do.
      if (key < __ldcg(slot)) atomicMin(slot, key);
    }
  }
}

__global__ void min_pool_keys_kernel(const long long* __restrict__ fine, int fine_width,
                                     long long* __restrict__ coarse, int coarse_height,
                                     int coarse_width, int ratio_y, int ratio_x) {
  const long long total = static_cast<long long>(coarse_height) * coarse_width;
  for (long long p = grid_start(); p < total; p += grid_stride()) {
    const long long r = p / coarse_width;
    const long long c = p - r * coarse_width;
    long long best = 0x7fffffffffffffffLL;
    for (int dy = 0; dy < ratio_y; ++dy) {
      const long long* line = fine + (r * ratio_y + dy) * fine_width + c * ratio_x;
      for (int dx = 0; dx < ratio_x; ++dx) best = min(best, line[dx]);
    }
    coarse[p] = best;
  }
}

template <typename T>
struct FeatureTraits;

template <>
struct FeatureTraits<float> {
  using Accum = float;
  __device__ static float one() { return 1.0f; }
  __device__ static float zero() { return 0.0f; }
  __device__ static Accum to_accum(float v) { return v; }
};

template <>
struct FeatureTraits<double> {
  using Accum = double;
  __device__ static double one() { return 1.0; }
  __device__ static double zero() { return 0.0; }
  __device__ static Accum to_accum(double v) { return v; }
};

template <>
struct FeatureTraits<__half> {
  using Accum = float;
  __device__ static __half one() { return __float2half(1.0f); }
  __device__ static __half zero() { return __float2half(0.0f); }
  __device__ static Accum to_accum(__half v) { return __half2float(v); }
};

template <>
struct FeatureTraits<__nv_bfloat16> {
  using Accum = float;
  __device__ static __nv_bfloat16 one() { return __float2bfloat16(1.0f); }
  __device__ static __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
  __device__ static Accum to_accum(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <typename T>
__global__ void gather_forward_kernel(const long long* __restrict__ index, long long pixels,
                                      const T* __restrict__ features, long long num_points,
                                      long long channels, const T* __restrict__ background,
                                      T* __restrict__ out) {
  const long long total = (channels + 1) * pixels;
  for (long long e = grid_start(); e < total; e += grid_stride()) {
    const long long c = e / pixels;
    const long long p = e - c * pixels;
    const long long idx = index[p];
    const bool hit = idx >= 0 && idx < num_points;
    T value;
    if (c == channels) {
      value = hit ? FeatureTraits<T>::one() : FeatureTraits<T>::zero();
    } else if (hit) {
      value = features[idx * channels + c];
    } else {
      value = background != nullptr ? background[c] : FeatureTraits<T>::zero();
    }
    out[e] = value;
  }
}

template <typename T>
__global__ void gather_backward_kernel(const long long* __restrict__ index, long long pixels,
                                       const T* __restrict__ grad_out, long long num_points,
                                       long long channels,
                                       typename FeatureTraits<T>::Accum* __restrict__ grad_accum) {
  const long long total = channels * pixels;
  for (long long e = grid_start(); e < total; e += grid_stride()) {
    const long long c = e / pixels;
    const long long p = e - c * pixels;
    const long long idx = index[p];
    if (idx >= 0 && idx < num_points) {
      atomicAdd(grad_accum + idx * channels + c, FeatureTraits<T>::to_accum(grad_out[e]));
    }
  }
}

template <typename T>
cudaError_t gather_forward_typed(const long long* index, long long pixels, const void* features,
                                 long long num_points, long long channels, const void* background,
                                 void* out, int max_blocks, cudaStream_t stream) {
  const long long total = (channels + 1) * pixels;
  if (total == 0) return cudaSuccess;
  gather_forward_kernel<T><<<blocks_for(total, max_blocks), kThreads, 0, stream>>>(
      index, pixels, static_cast<const T*>(features), num_points, channels,
      static_cast<const T*>(background), static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_backward_typed(const long long* index, long long pixels, const void* grad_out,
                                  long long num_points, long long channels, void* grad_accum,
                                  int max_blocks, cudaStream_t stream) {
  const long long total = channels * pixels;
  if (total == 0 || num_points == 0) return cudaSuccess;
  gather_backward_kernel<T><<<blocks_for(total, max_blocks), kThreads, 0, stream>>>(
      index, pixels, static_cast<const T*>(grad_out), num_points, channels,
      static_cast<typename FeatureTraits<T>::Accum*>(grad_accum));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rasterize_points(const float* points, long long n, long long index_offset,
                                    const float* rotation, const float* translation,
                                    ProjectionParams params, KeyImages images, int max_blocks,
                                    cudaStream_t stream) {
  if (n <= 0 || images.count <= 0) return cudaSuccess;
  rasterize_points_kernel<<<blocks_for(n, max_blocks), kThreads, 0, stream>>>(
      points, n, index_offset, rotation, translation, params, images);
  return cudaGetLastError();
}

cudaError_t launch_min_pool_keys(const long long* fine, int fine_width, long long* coarse,
                                 int coarse_height, int coarse_width, int ratio_y, int ratio_x,
                                 int max_blocks, cudaStream_t stream) {
  const long long total = static_cast<long long>(coarse_height) * coarse_width;
  if (total <= 0) return cudaSuccess;
  min_pool_keys_kernel<<<blocks_for(total, max_blocks), kThreads, 0, stream>>>(
      fine, fine_width, coarse, coarse_height, coarse_width, ratio_y, ratio_x);
  return cudaGetLastError();
}

cudaError_t launch_gather_forward(const long long* index, long long pixels, const void* features,
                                  long long num_points, long long channels, const void* background,
                                  void* out, FeatureType type, int max_blocks, cudaStream_t stream) {
  switch (type) {
    case FeatureType::kFloat32:
      return gather_forward_typed<float>(index, pixels, features, num_points, channels, background,
                                         out, max_blocks, stream);
    case FeatureType::kFloat64:
      return gather_forward_typed<double>(index, pixels, features, num_points, channels, background,
                                          out, max_blocks, stream);
    case FeatureType::kFloat16:
      return gather_forward_typed<__half>(index, pixels, features, num_points, channels, background,
                                          out, max_blocks, stream);
    case FeatureType::kBFloat16:
      return gather_forward_typed<__nv_bfloat16>(index, pixels, features, num_points, channels,
                                                 background, out, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gather_backward(const long long* index, long long pixels, const void* grad_out,
                                   long long num_points, long long channels, void* grad_accum,
                                   FeatureType type, int max_blocks, cudaStream_t stream) {
  switch (type) {
    case FeatureType::kFloat32:
      return gather_backward_typed<float>(index, pixels, grad_out, num_points, channels,
                                          grad_accum, max_blocks, stream);
    case FeatureType::kFloat64:
      return gather_backward_typed<double>(index, pixels, grad_out, num_points, channels,
                                           grad_accum, max_blocks, stream);
    case FeatureType::kFloat16:
      return gather_backward_typed<__half>(index, pixels, grad_out, num_points, channels,
                                           grad_accum, max_blocks, stream);
    case FeatureType::kBFloat16:
      return gather_backward_typed<__nv_bfloat16>(index, pixels, grad_out, num_points, channels,
                                                  grad_accum, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace npbgpp
