// pybind11 module fastppo._C_cuda: the CUDA launchers (csrc/cuda/kernels.h) over raw device pointers
// (Python ints), sizes, element strides, a device index and a cudaStream_t handle (torch's current stream,
// passed by fastppo/_native_launchers.py). No torch and no CUDA headers here; launches are asynchronous
// and a launch error raises RuntimeError with CUDA's message.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/contract_bindings.h"
#include "cuda/kernels.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("fastppo._C_cuda.") + what + ": " + fastppo::cuda::error_string(code));
  }
}

void check_logits(int dtype, int64_t B, int64_t T, int64_t V) {
  if (dtype < 0 || dtype >= fastppo::kNumDTypes) {
    throw std::invalid_argument("fastppo._C_cuda: unknown logits dtype code");
  }
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("fastppo._C_cuda: need B, T >= 0 and V >= 1");
  if (B * T > 0x7fffffffLL) throw std::invalid_argument("fastppo._C_cuda: more than 2^31-1 rows in one call");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastppo CUDA kernels (raw-pointer launchers; see fastppo/_native_launchers.py)";

  m.def(
      "logprobs_forward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT, uintptr_t labels,
         double inv_temp, uintptr_t logp, uintptr_t entropy, uintptr_t lse, int device, uintptr_t stream) {
        check_logits(dtype, B, T, V);
        check(fastppo::cuda::logprobs_forward(ptr<const void>(logits), dtype, B, T, V, sB, sT,
                                              ptr<const int64_t>(labels), static_cast<float>(inv_temp),
                                              ptr<float>(logp), ptr<float>(entropy), ptr<float>(lse), device,
                                              ptr<void>(stream)),
              "logprobs_forward");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"),
      py::arg("labels"), py::arg("inv_temp"), py::arg("logp"), py::arg("entropy"), py::arg("lse"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "logprobs_backward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT, uintptr_t labels,
         uintptr_t lse, uintptr_t entropy, uintptr_t g_logp, uintptr_t g_entropy, double inv_temp, uintptr_t out,
         int64_t out_sB, int64_t out_sT, int device, uintptr_t stream) {
        check_logits(dtype, B, T, V);
        if (g_entropy != 0 && entropy == 0) {
          throw std::invalid_argument("fastppo._C_cuda.logprobs_backward: grad_entropy needs the entropy");
        }
        check(fastppo::cuda::logprobs_backward(ptr<const void>(logits), dtype, B, T, V, sB, sT,
                                               ptr<const int64_t>(labels), ptr<const float>(lse),
                                               ptr<const float>(entropy), ptr<const float>(g_logp),
                                               ptr<const float>(g_entropy), static_cast<float>(inv_temp),
                                               ptr<void>(out), out_sB, out_sT, device, ptr<void>(stream)),
              "logprobs_backward");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"),
      py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("g_logp"), py::arg("g_entropy"),
      py::arg("inv_temp"), py::arg("out"), py::arg("out_sB"), py::arg("out_sT"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "ppo_loss_forward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT, uintptr_t labels,
         uintptr_t old_logp, uintptr_t adv, uintptr_t ref_logp, uintptr_t mask, double inv_temp, double clip_low,
         double clip_high, double dual_clip, int kl_kind, double kl_coef, double entropy_coef, uintptr_t terms,
         int device, uintptr_t stream) {
        check_logits(dtype, B, T, V);
        if (kl_kind < 0 || kl_kind >= fastppo::kNumKlKinds) {
          throw std::invalid_argument("fastppo._C_cuda: kl_kind must index KL_KINDS");
        }
        check(fastppo::cuda::ppo_loss_forward(
                  ptr<const void>(logits), dtype, B, T, V, sB, sT, ptr<const int64_t>(labels),
                  ptr<const float>(old_logp), ptr<const float>(adv), ptr<const float>(ref_logp),
                  ptr<const float>(mask), static_cast<float>(inv_temp), static_cast<float>(clip_low),
                  static_cast<float>(clip_high), static_cast<float>(dual_clip), kl_kind, static_cast<float>(kl_coef),
                  static_cast<float>(entropy_coef), ptr<float>(terms), device, ptr<void>(stream)),
              "ppo_loss_forward");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"),
      py::arg("labels"), py::arg("old_logp"), py::arg("adv"), py::arg("ref_logp"), py::arg("mask"),
      py::arg("inv_temp"), py::arg("clip_low"), py::arg("clip_high"), py::arg("dual_clip"), py::arg("kl_kind"),
      py::arg("kl_coef"), py::arg("entropy_coef"), py::arg("terms"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "gae_forward",
      [](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t bootstrap, int64_t B, int64_t T,
         double gamma, double lam, uintptr_t advantages, uintptr_t returns, int device, uintptr_t stream) {
        if (B < 0 || T < 0 || B > 0x7fffffffLL) throw std::invalid_argument("fastppo._C_cuda.gae_forward: bad B, T");
        check(fastppo::cuda::gae_forward(ptr<const float>(rewards), ptr<const float>(values),
                                         ptr<const uint8_t>(mask), ptr<const float>(bootstrap), B, T,
                                         gamma, lam, ptr<float>(advantages),
                                         ptr<float>(returns), device, ptr<void>(stream)),
              "gae_forward");
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("bootstrap"), py::arg("B"), py::arg("T"),
      py::arg("gamma"), py::arg("lam"), py::arg("advantages"), py::arg("returns"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  fastppo::add_contract_attrs(m);
}
