// Host (CPU) build of the rasterizer's per-point logic, for tests only: the same
// rasterizer_math.h the CUDA kernels use, compiled with g++ -ffp-contract=off and loaded
// through ctypes by tests/test_kernel_math.py, which compares it with the torch reference
// bit for bit. Single-threaded: a sequential min stands in for atomicMin.
#include "rasterizer_math.h"

extern "C" {

// params7: fx, fy, cx, cy, W, H, near (float32). keys[s]: heights[s] x widths[s] int64.
void npbgpp_host_rasterize(const float* points, long long n, long long index_offset,
                           const float* rotation, const float* translation, const float* params7,
                           int count, long long* const* keys, const int* heights, const int* widths) {
  const npbgpp::ProjectionParams p{params7[0], params7[1], params7[2], params7[3],
                                   params7[4], params7[5], params7[6]};
  for (long long i = 0; i < n; ++i) {
    const npbgpp::ProjectedPoint q = npbgpp::project_point(
        points[3 * i], points[3 * i + 1], points[3 * i + 2], rotation, translation, p, index_offset + i);
    if (!q.valid) continue;
    for (int s = 0; s < count; ++s) {
      const long long pixel = npbgpp::pixel_of(q.qx, q.qy, heights[s], widths[s]);
      if (pixel < 0) continue;
      if (q.key < keys[s][pixel]) keys[s][pixel] = q.key;
    }
  }
}

void npbgpp_host_min_pool(const long long* fine, int fine_width, long long* coarse, int coarse_height,
                          int coarse_width, int ratio_y, int ratio_x) {
  const long long total = static_cast<long long>(coarse_height) * coarse_width;
  for (long long p = 0; p < total; ++p) {
    coarse[p] = npbgpp::pooled_key(fine, fine_width, coarse_width, ratio_y, ratio_x, p);
  }
}

// float32 gather forward: out (C+1, pixels); background may be null.
void npbgpp_host_gather_forward(const long long* index, long long pixels, const float* features,
                                long long num_points, long long channels, const float* background, float* out) {
  const long long total = (channels + 1) * pixels;
  for (long long e = 0; e < total; ++e) {
    const npbgpp::GatherSource s =
        npbgpp::gather_source(index, pixels, num_points, channels, background != nullptr, e);
    switch (s.from) {
      case npbgpp::GatherFrom::kFeature:
        out[e] = features[s.offset];
        break;
      case npbgpp::GatherFrom::kBackground:
        out[e] = background[s.offset];
        break;
      case npbgpp::GatherFrom::kOne:
        out[e] = 1.0f;
        break;
      default:
        out[e] = 0.0f;
        break;
    }
  }
}

// float32 scatter-add of grad_out (C+1, pixels) into grad_accum (N, C), zero-initialised.
void npbgpp_host_gather_backward(const long long* index, long long pixels, const float* grad_out,
                                 long long num_points, long long channels, float* grad_accum) {
  const long long total = channels * pixels;
  for (long long e = 0; e < total; ++e) {
    const long long target = npbgpp::scatter_target(index, pixels, num_points, channels, e);
    if (target >= 0) grad_accum[target] += grad_out[e];
  }
}

}  // extern "C"
