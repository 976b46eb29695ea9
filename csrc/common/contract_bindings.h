// The contract's constants as attributes of a pybind11 module (both csrc bindings), so that
// fastppo/_native_launchers.py can check a built module against fastppo/_contract.py before using it.
#pragma once

#include <pybind11/pybind11.h>

#include "common/contract.h"

namespace fastppo {

inline pybind11::tuple names_tuple(const char* const* names, int n) {
  pybind11::tuple t(n);
  for (int i = 0; i < n; ++i) t[i] = pybind11::str(names[i]);
  return t;
}

// TERMS, KL_KINDS, DTYPES (names in code order), NUM_TERMS and LOG_RATIO_CLAMP.
inline void add_contract_attrs(pybind11::module_& m) {
  m.attr("TERMS") = names_tuple(kTermNames, kNumTerms);
  m.attr("NUM_TERMS") = static_cast<int>(kNumTerms);
  m.attr("KL_KINDS") = names_tuple(kKlKindNames, kNumKlKinds);
  m.attr("DTYPES") = names_tuple(kDTypeNames, kNumDTypes);
  m.attr("LOG_RATIO_CLAMP") = static_cast<double>(kLogRatioClamp);
}

}  // namespace fastppo
