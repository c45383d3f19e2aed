// Plain structs shared by the launchers, the kernels and the host build of the math.
#pragma once

namespace npbgpp {

// At most this many scales are rasterized by one launch (more: several launches).
constexpr int kMaxScalesPerLaunch = 8;

// One output key image: h x w packed (depth bits << 32 | index) int64 keys.
struct KeyImage {
  long long* keys;
  int height;
  int width;
};

struct KeyImages {
  KeyImage image[kMaxScalesPerLaunch];
  int count;
};

// The float32 camera numbers of RasterParams (R and T stay on the device).
struct ProjectionParams {
  float fx, fy, cx, cy;
  float width, height;  // full-resolution image size W, H as float32
  float near_depth;
};

enum class FeatureType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace npbgpp
