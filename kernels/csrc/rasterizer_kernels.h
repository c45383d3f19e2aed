// Launchers for the CUDA point rasterizer (rasterizer_kernels.cu).
//
// Plain C++/CUDA runtime types only, so the .cu file compiles without the torch headers
// (fast nvcc builds); rasterizer_binding.cpp does the tensor checks and calls these.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "rasterizer_types.h"

namespace npbgpp {

// Projects points[0..n) (float32 (n,3) row-major) with OpenCV R (3,3) row-major and t (3,) on the
// device and atomically keeps the smallest key per pixel of every image in `images`.
// Point i gets index index_offset + i in its key.
cudaError_t launch_rasterize_points(const float* points, long long n, long long index_offset,
                                    const float* rotation, const float* translation,
                                    ProjectionParams params, KeyImages images, int max_blocks,
                                    cudaStream_t stream);

// coarse[r, c] = min over fine[r*ry + dy, c*rx + dx] (dy < ry, dx < rx).
cudaError_t launch_min_pool_keys(const long long* fine, int fine_width, long long* coarse,
                                 int coarse_height, int coarse_width, int ratio_y, int ratio_x,
                                 int max_blocks, cudaStream_t stream);

// out (C+1, hw): out[c, p] = features[index[p], c] if 0 <= index[p] < n else background[c]
// (0 when background is null); out[C, p] = 1 where a point landed, else 0.
cudaError_t launch_gather_forward(const long long* index, long long pixels, const void* features,
                                  long long num_points, long long channels, const void* background,
                                  void* out, FeatureType type, int max_blocks, cudaStream_t stream);

// grad_features[index[p], c] += grad_out[c, p] for pixels with 0 <= index[p] < n.
// grad_accum is float32 (float64 for kFloat64 features), zero-initialised, (n, C).
cudaError_t launch_gather_backward(const long long* index, long long pixels, const void* grad_out,
                                   long long num_points, long long channels, void* grad_accum,
                                   FeatureType type, int max_blocks, cudaStream_t stream);

}  // namespace npbgpp
