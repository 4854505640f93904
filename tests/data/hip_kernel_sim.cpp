// The hip backend's kernel, compiled for HIP (compat_hip.cuh) but run on the host through
// hip_lanes/hip/hip_runtime.h: a shared library with one entry point, for one variant given
// as -DPA_SIM_VARIANT="<template arguments>" (either schedule: `balanced`) (tests/test_hip_rocm_compile.py drives it with
// hip.py's SplitKvParams over CPU tensors, and checks the result against the reference).
#include "compat.cuh"

// The kernel's dynamic shared memory is a buffer below 4 GB (LDS addresses are 32 bits in
// compat_hip.cuh); defined after compat.cuh, whose copy helpers name a parameter smem.
namespace pa {
unsigned char (*sim_lds)[] = nullptr;
}
#define smem (*sim_lds)
#include "paged_decode_split_kv.cu"

extern "C" int run_split_kv(const pa::SplitKvParams* params, int balanced, unsigned gx, unsigned gy, unsigned gz) {
  using Config = pa::SplitKvConfig<PA_SIM_VARIANT>;
  if (pa::sim_lds == nullptr) pa::sim_lds = reinterpret_cast<unsigned char (*)[]>(sim::lds_buffer(pa::SMEM_PER_CTA));
  if (pa::sim_lds == nullptr) return 2;
  sim::launch({gx, gy, gz}, Config::THREADS, [&] {
    if (balanced)
      pa::paged_decode_split_kv<PA_SIM_VARIANT, 2>(*params);  // launch bounds aside, as any n > 0
    else
      pa::paged_decode_split_kv<PA_SIM_VARIANT, 0>(*params);
  });
  return 0;
}
