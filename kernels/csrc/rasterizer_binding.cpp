// Torch bindings of the CUDA point rasterizer: tensor checks, streams, dtype dispatch.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "rasterizer_kernels.h"

namespace {

using npbgpp::FeatureType;

int max_blocks_for_device() {
  // Enough resident blocks to fill the GPU; grid-stride loops cover the rest.
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return (sm_count > 0 ? sm_count : 1) * 8;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_device_tensor(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "npbgpp rasterizer: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "npbgpp rasterizer: ", name, " is on ", t.device(),
              " but the points are on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "npbgpp rasterizer: ", name, " must be contiguous");
}

FeatureType feature_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FeatureType::kFloat32;
    case at::kDouble:
      return FeatureType::kFloat64;
    case at::kHalf:
      return FeatureType::kFloat16;
    case at::kBFloat16:
      return FeatureType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "npbgpp gather: features must be float32/float64/float16/bfloat16, got ", t.scalar_type());
  return FeatureType::kFloat32;
}

// Fills the given key images (int64, prefilled with INT64_MAX) from one pass over points.
void rasterize_points(const at::Tensor& points, const at::Tensor& rotation,
                      const at::Tensor& translation, double fx, double fy, double cx, double cy,
                      int64_t width, int64_t height, double near_depth,
                      const std::vector<at::Tensor>& key_images, int64_t index_offset) {
  TORCH_CHECK(points.dim() == 2 && points.size(1) == 3, "npbgpp rasterizer: points must be (N, 3), got ",
              points.sizes());
  TORCH_CHECK(points.scalar_type() == at::kFloat, "npbgpp rasterizer: points must be float32");
  check_device_tensor(points, points, "points");
  check_device_tensor(rotation, points, "R");
  check_device_tensor(translation, points, "t");
  TORCH_CHECK(rotation.scalar_type() == at::kFloat && rotation.numel() == 9, "R must be float32 (3, 3)");
  TORCH_CHECK(translation.scalar_type() == at::kFloat && translation.numel() == 3, "t must be float32 (3,)");
  TORCH_CHECK(width > 0 && height > 0, "image size must be positive");
  const int64_t n = points.size(0);
  TORCH_CHECK(index_offset >= 0 && index_offset + n <= INT64_C(2147483647),
              "npbgpp rasterizer: point indices must stay below 2**31 - 1 (the key holds 32 bits)");
  for (const auto& keys : key_images) {
    check_device_tensor(keys, points, "key image");
    TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 2, "key images must be int64 (h, w)");
    TORCH_CHECK(keys.size(0) > 0 && keys.size(1) > 0 && keys.size(0) < INT32_MAX && keys.size(1) < INT32_MAX,
                "key image size out of range: ", keys.sizes());
  }
  if (n == 0 || key_images.empty()) return;
  const c10::cuda::CUDAGuard guard(points.device());
  const cudaStream_t stream = current_stream();
  const npbgpp::ProjectionParams params{static_cast<float>(fx),    static_cast<float>(fy),
                                        static_cast<float>(cx),    static_cast<float>(cy),
                                        static_cast<float>(width), static_cast<float>(height),
                                        static_cast<float>(near_depth)};
  const int max_blocks = max_blocks_for_device();
  for (size_t first = 0; first < key_images.size(); first += npbgpp::kMaxScalesPerLaunch) {
    npbgpp::KeyImages images{};
    images.count = 0;
    for (size_t s = first; s < key_images.size() && images.count < npbgpp::kMaxScalesPerLaunch; ++s) {
      images.image[images.count++] = {reinterpret_cast<long long*>(key_images[s].data_ptr<int64_t>()),
                                      static_cast<int>(key_images[s].size(0)),
                                      static_cast<int>(key_images[s].size(1))};
    }
    C10_CUDA_CHECK(npbgpp::launch_rasterize_points(points.data_ptr<float>(), n, index_offset,
                                                   rotation.data_ptr<float>(), translation.data_ptr<float>(),
                                                   params, images, max_blocks, stream));
  }
}

// coarse = min-pool of fine over ratio_y x ratio_x blocks (exact pyramid reduction).
void min_pool_keys(const at::Tensor& fine, const at::Tensor& coarse) {
  check_device_tensor(fine, fine, "fine key image");
  check_device_tensor(coarse, fine, "coarse key image");
  TORCH_CHECK(fine.scalar_type() == at::kLong && coarse.scalar_type() == at::kLong && fine.dim() == 2 &&
                  coarse.dim() == 2,
              "key images must be int64 (h, w)");
  const int64_t hf = fine.size(0), wf = fine.size(1), h = coarse.size(0), w = coarse.size(1);
  TORCH_CHECK(h > 0 && w > 0 && hf % h == 0 && wf % w == 0, "coarse size ", coarse.sizes(),
              " does not divide fine size ", fine.sizes());
  TORCH_CHECK(hf < INT32_MAX && wf < INT32_MAX, "key image too large");
  const c10::cuda::CUDAGuard guard(fine.device());
  C10_CUDA_CHECK(npbgpp::launch_min_pool_keys(
      reinterpret_cast<const long long*>(fine.data_ptr<int64_t>()), static_cast<int>(wf),
      reinterpret_cast<long long*>(coarse.data_ptr<int64_t>()), static_cast<int>(h), static_cast<int>(w),
      static_cast<int>(hf / h), static_cast<int>(wf / w), max_blocks_for_device(),
      current_stream()));
}

at::Tensor gather_forward(const at::Tensor& index, const at::Tensor& features,
                          const std::optional<at::Tensor>& background_or_none) {
  check_device_tensor(features, features, "features");
  check_device_tensor(index, features, "index");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 2, "index must be int64 (h, w)");
  TORCH_CHECK(features.dim() == 2, "features must be (N, C)");
  const FeatureType type = feature_type(features);
  const at::Tensor background = background_or_none.has_value() ? *background_or_none : at::Tensor();
  const bool has_background = background.defined() && background.numel() > 0;
  if (has_background) {
    check_device_tensor(background, features, "background");
    TORCH_CHECK(background.scalar_type() == features.scalar_type() && background.numel() == features.size(1),
                "background must hold C values of the features' dtype");
  }
  const int64_t h = index.size(0), w = index.size(1), c = features.size(1);
  at::Tensor out = at::empty({c + 1, h, w}, features.options());
  const c10::cuda::CUDAGuard guard(features.device());
  C10_CUDA_CHECK(npbgpp::launch_gather_forward(
      reinterpret_cast<const long long*>(index.data_ptr<int64_t>()), h * w, features.data_ptr(),
      features.size(0), c, has_background ? background.data_ptr() : nullptr, out.data_ptr(), type,
      max_blocks_for_device(), current_stream()));
  return out;
}

// d(loss)/d(features) (N, C) in the features' dtype, from grad_out (C+1, h, w).
at::Tensor gather_backward(const at::Tensor& index, const at::Tensor& grad_out, int64_t num_points) {
  check_device_tensor(grad_out, grad_out, "grad_out");
  check_device_tensor(index, grad_out, "index");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(1) == index.size(0) && grad_out.size(2) == index.size(1),
              "grad_out must be (C+1, h, w) matching the index");
  const FeatureType type = feature_type(grad_out);
  const int64_t c = grad_out.size(0) - 1;
  const auto accum_dtype = type == FeatureType::kFloat64 ? at::kDouble : at::kFloat;
  at::Tensor accum = at::zeros({num_points, c}, grad_out.options().dtype(accum_dtype));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  C10_CUDA_CHECK(npbgpp::launch_gather_backward(
      reinterpret_cast<const long long*>(index.data_ptr<int64_t>()), index.numel(), grad_out.data_ptr(),
      num_points, c, accum.data_ptr(), type, max_blocks_for_device(), current_stream()));
  return accum.to(grad_out.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "npbgpp CUDA point rasterizer (see kernels/__init__.py for the Python API)";
  m.def("rasterize_points", &rasterize_points, "one pass over points into packed key images");
  m.def("min_pool_keys", &min_pool_keys, "coarse key image from a finer one");
  m.def("gather_forward", &gather_forward, "(C+1, h, w) features of the winning points");
  m.def("gather_backward", &gather_backward, "scatter-add of the feature gradient to the winners");
}
