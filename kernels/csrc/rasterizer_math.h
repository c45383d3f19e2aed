// Per-point and per-pixel arithmetic of the rasterizer, shared by the CUDA kernels and a
// host build (tests/test_kernel_math.py compiles it with g++ -ffp-contract=off and checks
// it against the torch reference on the CPU, so the exact float logic is tested without a
// GPU). Every float32 operation is a single IEEE round-to-nearest operation in the
// reference's order: __fmul_rn/__fadd_rn/__fdiv_rn on the device, plain operators with
// contraction disabled on the host.
#pragma once

#include <cmath>

#include "rasterizer_types.h"

#if defined(__CUDACC__)
#define NPBGPP_HD __host__ __device__ __forceinline__
#else
#define NPBGPP_HD inline
#endif

namespace npbgpp {

constexpr long long kEmptyKey = 0x7fffffffffffffffLL;

NPBGPP_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

NPBGPP_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

NPBGPP_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

NPBGPP_HD int float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int bits;
  __builtin_memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}

NPBGPP_HD bool finite(float f) {
#if defined(__CUDA_ARCH__)
  return isfinite(f);
#else
  return std::isfinite(f);
#endif
}

// x*r0 + y*r1 + z*r2 + t, left to right, each op rounded to float32 (as torch does it).
NPBGPP_HD float dot_plus(float x, float y, float z, float r0, float r1, float r2, float t) {
  float acc = add_rn(mul_rn(x, r0), mul_rn(y, r1));
  acc = add_rn(acc, mul_rn(z, r2));
  return add_rn(acc, t);
}

// A projected point: q = ((u + 0.5) / W, (v + 0.5) / H) and its packed key.
struct ProjectedPoint {
  bool valid;
  float qx, qy;
  long long key;
};

// rotation: OpenCV world-to-camera R, row-major (3,3): x_cam = R x_world + t (row i makes
// camera axis i; x right, y down, z forward).
NPBGPP_HD ProjectedPoint project_point(float x, float y, float z, const float* rotation,
                                       const float* translation, const ProjectionParams& p,
                                       long long index) {
  ProjectedPoint out{false, 0.0f, 0.0f, 0};
  const float xc = dot_plus(x, y, z, rotation[0], rotation[1], rotation[2], translation[0]);
  const float yc = dot_plus(x, y, z, rotation[3], rotation[4], rotation[5], translation[1]);
  const float zv = dot_plus(x, y, z, rotation[6], rotation[7], rotation[8], translation[2]);
  const float u = add_rn(mul_rn(div_rn(xc, zv), p.fx), p.cx);
  const float v = add_rn(mul_rn(div_rn(yc, zv), p.fy), p.cy);
  if (!(finite(u) && finite(v) && zv > p.near_depth)) return out;
  out.valid = true;
  out.qx = div_rn(add_rn(u, 0.5f), p.width);
  out.qy = div_rn(add_rn(v, 0.5f), p.height);
  // zv > near >= 0, so its bits are a non-negative int32 ordered like the depths.
  out.key = (static_cast<long long>(float_bits(zv)) << 32) | index;
  return out;
}

// Flat pixel index of q in an h x w image, or -1 when it falls outside:
// column floor(qx * w), row floor(qy * h), compared as float32 like the reference.
NPBGPP_HD long long pixel_of(float qx, float qy, int height, int width) {
  const float w = static_cast<float>(width);
  const float h = static_cast<float>(height);
  const float col = floorf(mul_rn(qx, w));
  const float row = floorf(mul_rn(qy, h));
  if (!(col >= 0.0f && col < w && row >= 0.0f && row < h)) return -1;
  return static_cast<long long>(row) * width + static_cast<long long>(col);
}

// min over the ratio_y x ratio_x block of fine keys under coarse pixel p.
NPBGPP_HD long long pooled_key(const long long* fine, int fine_width, int coarse_width, int ratio_y,
                               int ratio_x, long long p) {
  const long long r = p / coarse_width;
  const long long c = p - r * coarse_width;
  long long best = kEmptyKey;
  for (int dy = 0; dy < ratio_y; ++dy) {
    const long long* line = fine + (r * ratio_y + dy) * fine_width + c * ratio_x;
    for (int dx = 0; dx < ratio_x; ++dx) best = line[dx] < best ? line[dx] : best;
  }
  return best;
}

// Where element e of the gather output (C+1, pixels) comes from: a feature value (offset
// into the (N, C) features), a background value (offset = channel), or the constants 1/0
// (the mask channel C is 1 where a point landed; empty pixels without background are 0).
enum class GatherFrom : int { kFeature = 0, kBackground = 1, kOne = 2, kZero = 3 };

struct GatherSource {
  GatherFrom from;
  long long offset;
};

NPBGPP_HD GatherSource gather_source(const long long* index, long long pixels, long long num_points,
                                     long long channels, bool has_background, long long e) {
  const long long c = e / pixels;
  const long long p = e - c * pixels;
  const long long idx = index[p];
  const bool hit = idx >= 0 && idx < num_points;  // anything else counts as empty
  if (c == channels) return GatherSource{hit ? GatherFrom::kOne : GatherFrom::kZero, 0};
  if (hit) return GatherSource{GatherFrom::kFeature, idx * channels + c};
  return has_background ? GatherSource{GatherFrom::kBackground, c} : GatherSource{GatherFrom::kZero, 0};
}

// The (N, C) feature offset that element e of the feature gradient (C, pixels) adds to,
// or -1 for an empty pixel (its gradient belongs to the background).
NPBGPP_HD long long scatter_target(const long long* index, long long pixels, long long num_points,
                                   long long channels, long long e) {
  const long long c = e / pixels;
  const long long p = e - c * pixels;
  const long long idx = index[p];
  return (idx >= 0 && idx < num_points) ? idx * channels + c : -1;
}

}  // namespace npbgpp
