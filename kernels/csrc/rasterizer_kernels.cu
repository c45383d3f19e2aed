// CUDA multi-scale nearest-point rasterizer and feature gather for npbgpp_core.
//
// Bit-exact contract with npbgpp_core.rasterizer.rasterize_keys_torch: the arithmetic
// lives in rasterizer_math.h, where every float32 operation is an explicitly rounded
// intrinsic (__fmul_rn/__fadd_rn/__fdiv_rn) in the reference's order, so neither FMA
// contraction nor fast division can change a result (the build also passes -fmad=false).
#include "rasterizer_kernels.h"
#include "rasterizer_math.h"

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

__global__ void rasterize_points_kernel(const float* __restrict__ points, long long n,
                                        long long index_offset, const float* __restrict__ rotation,
                                        const float* __restrict__ translation, ProjectionParams p,
                                        KeyImages images) {
  float rot[9], trans[3];
  for (int k = 0; k < 9; ++k) rot[k] = rotation[k];
  for (int k = 0; k < 3; ++k) trans[k] = translation[k];
  for (long long i = grid_start(); i < n; i += grid_stride()) {
    const ProjectedPoint q =
        project_point(points[3 * i], points[3 * i + 1], points[3 * i + 2], rot, trans, p, index_offset + i);
    if (!q.valid) continue;
    for (int s = 0; s < images.count; ++s) {
      const KeyImage img = images.image[s];
      const long long pixel = pixel_of(q.qx, q.qy, img.height, img.width);
      if (pixel < 0) continue;
      long long* slot = img.keys + pixel;
      // Keys only ever decrease, so a (possibly stale) value <= key means nothing to do.
      if (q.key < __ldcg(slot)) atomicMin(slot, q.key);
    }
  }
}

__global__ void min_pool_keys_kernel(const long long* __restrict__ fine, int fine_width,
                                     long long* __restrict__ coarse, int coarse_height,
                                     int coarse_width, int ratio_y, int ratio_x) {
  const long long total = static_cast<long long>(coarse_height) * coarse_width;
  for (long long p = grid_start(); p < total; p += grid_stride()) {
    coarse[p] = pooled_key(fine, fine_width, coarse_width, ratio_y, ratio_x, p);
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
  const bool has_background = background != nullptr;
  for (long long e = grid_start(); e < total; e += grid_stride()) {
    const GatherSource source = gather_source(index, pixels, num_points, channels, has_background, e);
    T value;
    switch (source.from) {
      case GatherFrom::kFeature:
        value = features[source.offset];
        break;
      case GatherFrom::kBackground:
        value = background[source.offset];
        break;
      case GatherFrom::kOne:
        value = FeatureTraits<T>::one();
        break;
      default:
        value = FeatureTraits<T>::zero();
        break;
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
    const long long target = scatter_target(index, pixels, num_points, channels, e);
    if (target >= 0) atomicAdd(grad_accum + target, FeatureTraits<T>::to_accum(grad_out[e]));
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
