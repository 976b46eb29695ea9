// pybind11 module fastppo._C_cpu: the CPU kernels over raw pointers (Python ints), sizes and strides.
//
// No libtorch: fastppo/_native_launchers.py allocates the torch tensors and passes data_ptr()s, so the
// module builds without torch and works with any installed torch version. The GIL is released while the
// kernels run. Pointers of absent optional inputs are 0.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/contract_bindings.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using fastppo::cpu::LogitsView;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

LogitsView logits_view(uintptr_t data, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT) {
  if (dtype < 0 || dtype >= fastppo::kNumDTypes) {
    throw std::invalid_argument("fastppo._C_cpu: unknown logits dtype code " + std::to_string(dtype));
  }
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("fastppo._C_cpu: need B, T >= 0 and V >= 1");
  if (data == 0 && B * T > 0) throw std::invalid_argument("fastppo._C_cpu: null logits pointer");
  return LogitsView{ptr<const void>(data), dtype, B, T, V, sB, sT};
}

int threads_or_default(int threads) { return threads > 0 ? threads : 1; }

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastppo C++/OpenMP CPU kernels (raw-pointer launchers; see fastppo/_native_launchers.py)";

  m.def(
      "logprobs_forward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT, uintptr_t labels,
         double inv_temp, uintptr_t logp, uintptr_t entropy, uintptr_t lse, int threads) {
        fastppo::cpu::LogprobsFwdArgs a{logits_view(logits, dtype, B, T, V, sB, sT),
                                        ptr<const int64_t>(labels),
                                        static_cast<float>(inv_temp),
                                        ptr<float>(logp),
                                        ptr<float>(entropy),
                                        ptr<float>(lse),
                                        threads_or_default(threads)};
        fastppo::cpu::logprobs_forward(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"),
      py::arg("labels"), py::arg("inv_temp"), py::arg("logp"), py::arg("entropy"), py::arg("lse"),
      py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
      "Per row: logp [N], entropy [N] (pointer 0 = skip), lse [N] from logits [B, T, V].");

  m.def(
      "logprobs_backward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT, uintptr_t labels,
         uintptr_t lse, uintptr_t entropy, uintptr_t g_logp, uintptr_t g_entropy, double inv_temp, uintptr_t out,
         int64_t out_sB, int64_t out_sT, int threads) {
        if (g_entropy != 0 && entropy == 0) {
          throw std::invalid_argument("fastppo._C_cpu.logprobs_backward: grad_entropy needs the entropy");
        }
        fastppo::cpu::LogprobsBwdArgs a{logits_view(logits, dtype, B, T, V, sB, sT),
                                        ptr<const int64_t>(labels),
                                        ptr<const float>(lse),
                                        ptr<const float>(entropy),
                                        ptr<const float>(g_logp),
                                        ptr<const float>(g_entropy),
                                        static_cast<float>(inv_temp),
                                        ptr<void>(out),
                                        out_sB,
                                        out_sT,
                                        threads_or_default(threads)};
        fastppo::cpu::logprobs_backward(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"),
      py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("g_logp"), py::arg("g_entropy"),
      py::arg("inv_temp"), py::arg("out"), py::arg("out_sB"), py::arg("out_sT"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(),
      "dlogits into out [B, T, V] (logits' dtype; out may be logits itself).");

  m.def(
      "ppo_loss_forward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB, int64_t sT, uintptr_t labels,
         uintptr_t old_logp, uintptr_t adv, uintptr_t ref_logp, uintptr_t mask, double inv_temp, double clip_low,
         double clip_high, double dual_clip, int kl_kind, double kl_coef, double entropy_coef, uintptr_t terms,
         int threads) {
        if (kl_kind < 0 || kl_kind >= fastppo::kNumKlKinds) {
          throw std::invalid_argument("fastppo._C_cpu.ppo_loss_forward: kl_kind must index KL_KINDS");
        }
        fastppo::cpu::PpoFwdArgs a{logits_view(logits, dtype, B, T, V, sB, sT),
                                   ptr<const int64_t>(labels),
                                   ptr<const float>(old_logp),
                                   ptr<const float>(adv),
                                   ptr<const float>(ref_logp),
                                   ptr<const float>(mask),
                                   static_cast<float>(inv_temp),
                                   static_cast<float>(clip_low),
                                   static_cast<float>(clip_high),
                                   static_cast<float>(dual_clip),
                                   kl_kind,
                                   static_cast<float>(kl_coef),
                                   static_cast<float>(entropy_coef),
                                   ptr<float>(terms),
                                   threads_or_default(threads)};
        fastppo::cpu::ppo_loss_forward(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"),
      py::arg("labels"), py::arg("old_logp"), py::arg("adv"), py::arg("ref_logp"), py::arg("mask"),
      py::arg("inv_temp"), py::arg("clip_low"), py::arg("clip_high"), py::arg("dual_clip"), py::arg("kl_kind"),
      py::arg("kl_coef"), py::arg("entropy_coef"), py::arg("terms"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(), "Per-token PPO terms [NUM_TERMS, N] in PPO_TERMS order.");

  m.def(
      "gae_forward",
      [](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t bootstrap, int64_t B, int64_t T,
         double gamma, double lam, uintptr_t advantages, uintptr_t returns, int threads) {
        if (B < 0 || T < 0) throw std::invalid_argument("fastppo._C_cpu.gae_forward: need B, T >= 0");
        fastppo::cpu::GaeArgs a{ptr<const float>(rewards), ptr<const float>(values), ptr<const uint8_t>(mask),
                                ptr<const float>(bootstrap), B, T, gamma, lam, ptr<float>(advantages),
                                ptr<float>(returns), threads_or_default(threads)};
        fastppo::cpu::gae_forward(a);
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("bootstrap"), py::arg("B"), py::arg("T"),
      py::arg("gamma"), py::arg("lam"), py::arg("advantages"), py::arg("returns"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(), "GAE reverse scan: advantages, returns [B, T] (float32).");

  m.def(
      "sample_forward",
      [](uintptr_t logits, int dtype, int64_t B, int64_t V, int64_t sB, uintptr_t uniforms, double inv_temp,
         int top_k, double top_p, uintptr_t out, int threads) {
        if (dtype < fastppo::kFloat32 || dtype > fastppo::kFloat16) {
          throw std::invalid_argument("fastppo._C_cpu.sample_forward: unknown logits dtype code " +
                                      std::to_string(dtype));
        }
        if (B < 0 || V < 1) throw std::invalid_argument("fastppo._C_cpu.sample_forward: need B >= 0, V >= 1");
        if (B > 0 && (logits == 0 || uniforms == 0 || out == 0)) {
          throw std::invalid_argument("fastppo._C_cpu.sample_forward: null pointer");
        }
        fastppo::cpu::SampleArgs a{ptr<const void>(logits), dtype, B, V, sB, ptr<const double>(uniforms),
                                   static_cast<float>(inv_temp), top_k, top_p, ptr<int64_t>(out),
                                   threads_or_default(threads)};
        fastppo::cpu::sample_forward(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("V"), py::arg("sB"), py::arg("uniforms"),
      py::arg("inv_temp"), py::arg("top_k"), py::arg("top_p"), py::arg("out"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>(),
      "One sampled token per row of logits [B, V] (temperature, top-k, top-p, inverse-CDF draw) into out [B].");

  m.def("simd_level", &fastppo::cpu::simd_level, "'avx512', 'avx2' or 'scalar': the row kernels that run.");
  m.def("set_simd_level", &fastppo::cpu::set_simd_level, py::arg("level"),
        "Cap the row kernels at 'avx512', 'avx2' or 'scalar' (capped again by what the CPU supports); returns "
        "the level in use.");
  m.def("team_size", &fastppo::cpu::team_size, py::arg("work"), py::arg("threads"),
        "OpenMP threads a kernel uses for `work` elements (logits or GAE tokens) given `threads` (1 below "
        "PARALLEL_MIN_WORK: small problems stay on the calling thread).");
  m.attr("PARALLEL_MIN_WORK") = static_cast<int64_t>(fastppo::cpu::kParallelMinWork);
  fastppo::add_contract_attrs(m);
}
