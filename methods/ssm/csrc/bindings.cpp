// The Python module of the CUDA kernels in this folder (built by methods/ssm/cuda_scan.py `extension`).
#include <torch/extension.h>

#include <map>
#include <optional>
#include <string>

// scan_sp.cu
void run(const std::string& kernel, const std::map<std::string, at::Tensor>& t,
         const std::map<std::string, int64_t>& n);
void carry(const at::Tensor& summary, const at::Tensor& dtsum, const at::Tensor& A, at::Tensor& carry, bool reverse);
// channel_ops.cu
void conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y);
void conv_bwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& dy,
              const std::optional<at::Tensor>& dy2, at::Tensor& dx, at::Tensor& dw_part, at::Tensor& db_part);
bool conv_proj_supports(int64_t E, int64_t N);
void conv_proj_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y,
                   const at::Tensor& w_proj, at::Tensor& proj);
bool linear_supports(int64_t K, int64_t N);
int64_t linear_blocks(int64_t L);
void linear_fwd(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, bool reverse,
                const std::optional<at::Tensor>& x2, const std::optional<at::Tensor>& y2);
void linear_bwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy, at::Tensor& dx, at::Tensor& dw_part,
                bool reverse, const std::optional<at::Tensor>& dy2);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "run one pass of the sequence-parallel selective scan");
  m.def("carry", &carry, "the scan's carry between superblocks");
  m.def("conv_fwd", &conv_fwd, "causal depthwise conv1d + SiLU");
  m.def("conv_bwd", &conv_bwd, "its backward (gradient dy + dy2)");
  m.def("conv_proj_supports", &conv_proj_supports, "whether conv_proj_fwd is compiled for E channels, N outputs");
  m.def("conv_proj_fwd", &conv_proj_fwd, "conv_fwd, then a linear map of its output (the mixer's x_proj)");
  m.def("linear_supports", &linear_supports, "whether a K -> N linear map is compiled");
  m.def("linear_blocks", &linear_blocks, "blocks per batch element of the linear maps' backward");
  m.def("linear_fwd", &linear_fwd,
        "token-wise linear map (x2: a second input read backwards, its map added; y2: the map written backwards)");
  m.def("linear_bwd", &linear_bwd, "its backward: dx and per-block dw sums (dy2: a reversed map's gradient, added)");
}
