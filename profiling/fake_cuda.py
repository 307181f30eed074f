"""Inductor's real CUDA code generation on a machine with no GPU, under a faked CUDA device.

What profiling/launches.py counts with (the team's gpu_offline.py tool uses the same method):

  1. `load()`: a tiny C++ library, built here once per torch install with g++ against torch's
     headers, registers a no-op CUDA device guard (c10's own FakeGuardImpl) and CUDA hooks that
     say "built, one device". That lets meta-backed fake CUDA tensors through Python indexing
     and the autograd engine, which a CPU-only torch otherwise refuses. It must be loaded before
     `import torch`, so this module imports torch only inside its functions.
  2. `retarget_to_cuda(gm)`: a graph dynamo captured on the CPU gets its device constants moved
     to cuda:0.
  3. `fake_cuda()`: a context in which torch, inductor and Triton believe one CUDA device exists
     (mocked device properties of an H100 SXM: 132 SMs, cc 9.0, and a fake Triton driver).
     `torch._inductor.compile_fx` run inside it on fake CUDA inputs takes the real CUDA code
     generation path (Triton scheduling, cuBLAS externs, foreach combo kernels); inductor's
     constant folding runs its constant subgraphs on the CPU. The caller stops inductor before
     the generated module is loaded (loading would compile and launch).
  4. `analyse_module(code)`: the generated module is parsed for the kernel launches of one call
     of the compiled step: Triton launches (by kind), extern (cuBLAS) calls, ATen fallbacks.

Nothing here runs a GPU kernel: every number is a compile-time fact, never a timing. What cannot
be known without a GPU: inductor benchmarks on the device whether to pad a compute-bound matmul
whose sizes are not multiples of 4 (pad_mm); those decisions are taken as "no pad" and listed in
PAD_DECISIONS. cuBLAS may run more than one kernel per call.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import re
import subprocess
import types
import warnings

FAKE_CUDA_CPP = r"""
// A fake CUDA device for tracing with a CPU-only torch build: a no-op device guard for CUDA
// (c10's own FakeGuardImpl) and CUDA hooks that report "built, one device, no context".
// Nothing here can run a kernel; it only lets meta-backed fake CUDA tensors through the Python
// indexing bindings (which take a device guard) and the autograd engine (which asks for the
// accelerator's streams).
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
namespace {
struct FakeCUDAHooks final : at::CUDAHooksInterface {
  FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  int getNumGPUs() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void init() const override {}
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex) const override { return 0; }
};
}  // namespace
namespace at {
// getCUDAHooks() creates the "CUDAHooks" entry once, on first use: load before `import torch`.
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks);
}
"""

# An H100 SXM5 80GB as torch.cuda.get_device_properties reports it (plus the clocks that
# Triton's fallback FLOP/s and bandwidth estimates read).
H100 = dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
            total_memory=85_045_624_832, max_threads_per_multi_processor=2048,
            max_threads_per_block=1024, regs_per_multiprocessor=65536, warp_size=32,
            L2_cache_size=50 * 2**20, shared_memory_per_block=49152,
            shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
            is_integrated=False, is_multi_gpu_board=False, gcnArchName="NVIDIA H100 80GB HBM3",
            uuid="00000000-0000-0000-0000-000000000000", clock_rate=1980000,
            max_sm_clock_mhz=1980, mem_clock_rate=2619000, mem_bus_width=5120)

# pad_mm decisions inductor would have benchmarked on a GPU, taken as "no pad" (see fake_cuda).
PAD_DECISIONS: list = []


def build_fake_cuda_lib() -> str:
    """Build (once per torch install) the fake-CUDA library; return its path. Does not import torch."""
    torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin)
    with open(os.path.join(torch_dir, "version.py"), encoding="utf-8") as f:
        version = f.read()
    key = hashlib.sha256((FAKE_CUDA_CPP + version + torch_dir).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dtql_gpu_offline")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"libfakecuda-{key}.so")
    if os.path.exists(lib):
        return lib
    src = os.path.join(cache, f"fakecuda-{key}.cpp")
    with open(src, "w", encoding="utf-8") as f:
        f.write(FAKE_CUDA_CPP)
    tmp = lib + f".tmp{os.getpid()}"
    cmd = [os.environ.get("CXX", "g++"), "-O1", "-shared", "-fPIC", "-std=c++20", "-w",
           "-D_GLIBCXX_USE_CXX11_ABI=1", f"-I{torch_dir}/include", src, f"-L{torch_dir}/lib",
           "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir}/lib", "-o", tmp]
    subprocess.run(cmd, check=True)
    os.replace(tmp, lib)
    return lib


def load() -> None:
    """Prepare this process for fake CUDA: compiled (not interpreted) Triton, and the fake-CUDA
    library loaded. Call it before `import torch`: torch registers its CUDA hooks on first use."""
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    ctypes.CDLL(build_fake_cuda_lib(), mode=ctypes.RTLD_GLOBAL)


@contextlib.contextmanager
def fake_cuda(props=H100):
    """Make torch, inductor and Triton believe one CUDA device (`props`) exists; yields the
    properties. Needs the fake CUDA library loaded (`load`); only fake (meta-backed) CUDA tensors
    can exist."""
    from unittest import mock

    import torch
    import torch._subclasses.fake_tensor as ft
    from torch._dynamo import device_interface as di
    from torch._inductor.constant_folding import ConstantFolder
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver as triton_driver

    P = types.SimpleNamespace(**props)
    cap = (P.major, P.minor)

    class FakeDriver(DriverBase):
        @classmethod
        def is_active(cls): return True
        def map_python_to_cpp_type(self, ty): return ty
        def get_current_target(self): return GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
        def get_active_torch_device(self): return torch.device("cuda", 0)
        def get_benchmarker(self): raise RuntimeError("fake CUDA: nothing can be benchmarked")
        def get_current_device(self): return 0
        def set_current_device(self, device): pass
        def get_current_stream(self, device=None): return 0
        def get_device_capability(self, device=None): return cap
        def get_device_interface(self): return torch.cuda

    fns = dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
               get_device_properties=lambda d=None: P, get_device_capability=lambda d=None: cap,
               get_device_name=lambda d=None: P.name, _lazy_init=lambda: None,
               is_initialized=lambda: True, set_device=lambda d: None,
               synchronize=lambda d=None: None, is_bf16_supported=lambda *a, **k: True,
               get_rng_state=lambda d=None: torch.zeros(16, dtype=torch.uint8),
               set_rng_state=lambda s, d=None: None, manual_seed=lambda s: None,
               manual_seed_all=lambda s: None, _exchange_device=lambda d: 0,
               _maybe_exchange_device=lambda d: 0)
    patches = [mock.patch.object(torch.cuda, k, v) for k, v in fns.items()]
    ci = di.CudaInterface  # binds torch.cuda functions at import: patch it too
    for k in ("current_device", "device_count", "get_device_properties", "set_device",
              "synchronize", "is_bf16_supported"):
        patches.append(mock.patch.object(ci, k, staticmethod(fns[k])))
    patches += [mock.patch.object(ci, "is_available", staticmethod(lambda: True)),
                mock.patch.object(ci, "get_compute_capability", staticmethod(lambda d=None: cap[0] * 10 + cap[1])),
                mock.patch.object(ci.Worker, "get_device_properties", staticmethod(lambda d=None: P)),
                mock.patch.object(ci.Worker, "current_device", staticmethod(lambda: 0))]
    # Fake tensors must never run a real op on CUDA (no kernels exist): no device init, and
    # no constant propagation through device copies.
    patches += [mock.patch.object(ft, "init_gpu_context", lambda device: None),
                mock.patch.object(ft.FakeTensorMode, "avoid_device_init", property(lambda self: True))]

    # Inductor's constant folding evaluates constant subgraphs for real: on the CPU here.
    cpu = torch.device("cpu")

    class CudaOnCpu(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            args, kwargs = pytree.tree_map(
                lambda x: cpu if isinstance(x, torch.device) and x.type == "cuda" else x, (args, kwargs or {}))
            return func(*args, **kwargs)

    fold = ConstantFolder.run

    def fold_on_cpu(self, *a, **k):
        with CudaOnCpu():
            return fold(self, *a, **k)
    patches.append(mock.patch.object(ConstantFolder, "run", fold_on_cpu))

    # pad_mm: peak fp32 FLOP/s and DRAM bandwidth as Triton's fallback computes them on a real
    # device; a compute-bound matmul with a paddable dim is benchmarked on the GPU by inductor,
    # impossible here: record it and answer "no pad".
    import torch._inductor.utils as iu
    from torch._inductor.fx_passes import pad_mm
    tflops = P.multi_processor_count * 4 * P.max_sm_clock_mhz * 32 * 1e-6
    dram_gbps = P.mem_clock_rate * P.mem_bus_width * 2 / 1e6 / 8
    patches += [mock.patch.object(iu, "get_device_tflops", lambda dtype: tflops),
                mock.patch.object(iu, "get_gpu_dram_gbps", lambda: dram_gbps)]

    def should_pad(match, mat1, mat2, op, input=None):
        if op is torch.ops.aten.mm or op is torch.ops.aten.addmm:
            m, k, n = mat1.shape[0], mat1.shape[1], mat2.shape[1]
        elif op is torch.ops.aten.bmm:
            m, k, n = mat1.shape[1], mat1.shape[2], mat2.shape[2]
        else:
            return False
        if torch._inductor.config.force_shape_pad:
            return True
        if not pad_mm.is_mm_compute_bound(int(m), int(k), int(n), mat1.dtype):
            return False
        PAD_DECISIONS.append(f"{op.__name__} {int(m)}x{int(k)}x{int(n)}")
        return False
    patches.append(mock.patch.object(pad_mm, "_should_pad", should_pad))

    # Generated kernel modules switch Triton to the real CUDA driver (it needs libcuda).
    from torch._inductor.runtime import triton_helpers
    patches.append(mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: None))

    def clear_caches():
        import torch._inductor.utils as iu_
        import torch.utils._triton as ut
        from torch._inductor.runtime.hints import DeviceProperties
        for mod in (ut, iu_):
            for v in list(vars(mod).values()):
                if callable(getattr(v, "cache_clear", None)):
                    v.cache_clear()
        DeviceProperties.create.cache_clear()

    old_driver = triton_driver._active
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        triton_driver.set_active(FakeDriver())
        clear_caches()
        try:
            yield P
        finally:
            triton_driver._active = old_driver
            clear_caches()


def retarget_to_cuda(gm) -> int:
    """Move the device constants of a CPU-captured graph (and its subgraphs) to cuda:0; return
    how many nodes changed."""
    import torch
    cuda = torch.device("cuda", 0)

    def move(x):
        if isinstance(x, torch.device) and x.type == "cpu":
            return cuda
        if isinstance(x, (list, tuple)):
            return type(x)(move(a) for a in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    moved = 0
    for _, mod in gm.named_modules():
        if isinstance(mod, torch.fx.GraphModule):
            for n in mod.graph.nodes:
                args, kwargs = move(n.args), move(n.kwargs)
                if args != n.args or kwargs != n.kwargs:
                    moved += 1
                n.args, n.kwargs = args, kwargs
            mod.recompile()
    return moved


_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.triton\('(\w+)', '''\n(.*?)''', device_str='(\w+)'\)",
                         re.S | re.M)


def analyse_module(code: str) -> dict:
    """Kernels defined and launched per step by one inductor output module."""
    defs = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in _KERNEL_DEF.finditer(code)}
    start = code.index("    def call(self, args):")
    end = code.find("\nrunner = ", start)
    body = [ln.strip() for ln in code[start:end if end > 0 else None].splitlines()]
    body = [ln for ln in body if ln and not ln.startswith("#")]
    launches, externs, fallbacks = {}, {}, {}
    for ln in body:
        m = re.match(r"(?:\w+ = )?(\w+)\.run\(", ln)
        if m and m.group(1) in defs:
            launches[m.group(1)] = launches.get(m.group(1), 0) + 1
            continue
        m = re.match(r"(?:\w+ = )?extern_kernels\.(\w+)\(", ln)
        if m:
            externs[m.group(1)] = externs.get(m.group(1), 0) + 1
            continue
        m = re.match(r"(?:\w+ = )?(?:torch\.ops\.)?(aten|prims|inductor)\.([\w.]+)\(", ln)
        if m:
            fallbacks[f"{m.group(1)}.{m.group(2)}"] = fallbacks.get(f"{m.group(1)}.{m.group(2)}", 0) + 1
    kinds = {"pointwise": 0, "reduction": 0, "persistent": 0, "foreach": 0, "template": 0, "user": 0}
    kind_launches = dict(kinds)
    for var, (kname, src, _) in defs.items():
        kind = ("pointwise" if kname.startswith("triton_poi") else "reduction" if kname.startswith("triton_red")
                else "persistent" if kname.startswith("triton_per") else "foreach" if kname.startswith("triton_for")
                else "template" if kname.startswith("triton_tem") else "user")
        kinds[kind] += 1
        kind_launches[kind] += launches.get(var, 0)
    return {"kernels_defined": len(defs), "triton_launches": sum(launches.values()),
            "extern_calls": externs, "fallbacks": fallbacks, "kinds_defined": kinds,
            "kinds_launched": kind_launches, "launch_counts": launches,
            "user_kernels": {v: defs[v][0] for v in defs if not defs[v][0].startswith("triton_")},
            "cuda_kernels": sum(1 for d in defs.values() if d[2] == "cuda")}
