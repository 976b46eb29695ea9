// The launcher contract's constants for the C++ and CUDA kernels, defined once (Python: fastppo/_contract.py).
//
// Plain C++ that nvcc and the host compiler both read. The bindings expose these values (TERMS, KL_KINDS,
// LOG_RATIO_CLAMP, DTYPES) and fastppo/_native_launchers.py refuses a module whose values differ from the
// Python ones, so the two definitions cannot drift apart unnoticed (tests/contract/test_constants.py).
#pragma once

// Functions both the CPU kernels and the CUDA kernels call (ppo_epilogue.h).
#if defined(__CUDACC__)
#define FASTPPO_HD __host__ __device__
#else
#define FASTPPO_HD
#endif

namespace fastppo {

// Row order of the ppo_loss_forward `terms` output ([kNumTerms, N]).
enum Term : int { kLogp, kEntropy, kLse, kPg, kRatio, kKl, kDpg, kDkl, kClipped, kDualClipped, kLoss, kNumTerms };
constexpr const char* kTermNames[kNumTerms] = {"logp", "entropy", "lse",     "pg",           "ratio", "kl",
                                               "dpg",  "dkl",     "clipped", "dual_clipped", "loss"};

// KL estimators, indexed by the launchers' `kl_kind`.
enum KlKind : int { kK1, kK2, kK3, kAbs, kNumKlKinds };
constexpr const char* kKlKindNames[kNumKlKinds] = {"k1", "k2", "k3", "abs"};

// ratio = exp(clamp(logp - old_logp, -kLogRatioClamp, kLogRatioClamp)); the gradient passes on the closed range.
constexpr float kLogRatioClamp = 20.0f;

// Element type codes of the logits, passed next to each raw pointer.
enum DType : int { kFloat32, kBFloat16, kFloat16, kNumDTypes };
constexpr const char* kDTypeNames[kNumDTypes] = {"float32", "bfloat16", "float16"};

}  // namespace fastppo
