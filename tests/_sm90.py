"""Compile Triton kernels for sm_90 on a machine without a GPU, as a launch on an H100/H200 would.

TTIR -> PTX -> cubin with Triton's bundled ptxas: a kernel that only the GPU compiler rejects fails on the CPU, and
the cubin's resource usage (shared memory, register spills) can be checked before any GPU run. The compile must run
with ``TRITON_INTERPRET=0``, which the test process cannot switch back, so each test runs a script in a fresh
process (``run_compile_script``) that calls ``compile_for_sm90``. ``gate_facts`` compiles every kernel config the
autotuners may pick (two processes) for tests/test_sm90_gate.py.
"""
import json
import os
import subprocess
import sys
import tempfile

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for_sm90(fn, signature, attrs, constexprs, **options):
    """Compile ``fn`` (a ``triton.jit`` function) for sm_90 (always afresh, so that ptxas runs and reports).

    Returns shared memory (bytes), the PTX, and what ptxas (-v) and the SASS say: ``registers`` per thread,
    ``stack`` (stack frame bytes), ``spill_bytes`` (spill stores), ``c7515`` (how many
    "wgmma serialized" warnings), and the counts of ``HGMMA`` (Hopper tensor-core matmul), ``UTMALDG`` (TMA tile
    load) and ``USETMAXREG`` (``setmaxnreg``: warp specialisation re-balanced the registers) instructions.
    """
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers, spills, warnings (printed by Triton)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas_log = log.getvalue()
    facts = {"shared": compiled.metadata.shared, "ptx": compiled.asm["ptx"],
             "registers": int(re.search(r"Used (\d+) registers", ptxas_log).group(1)),
             "stack": int(re.search(r"(\d+) bytes stack frame", ptxas_log).group(1)),
             "spill_bytes": int(re.search(r"(\d+) bytes spill stores", ptxas_log).group(1)),
             "c7515": len(re.findall(r"C7515", ptxas_log))}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        # -ndf: no data-flow analysis (a third faster; only the opcodes are read).
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", "-ndf", f.name], capture_output=True, text=True,
                              check=True).stdout
    for opcode in ("HGMMA", "UTMALDG", "USETMAXREG"):
        facts[opcode.lower()] = len(re.findall(rf"\b{opcode}\b", sass))
    return facts


def run_compile_script(script: str):
    """Run ``script`` (its last printed line is JSON) in a fresh process with the interpreter off; return that JSON.
    Skips when this Triton build has no bundled ptxas."""
    import pytest

    if not os.path.exists(nvidia_tool("ptxas")):
        pytest.skip("this Triton build has no bundled ptxas")
    done = subprocess.run([sys.executable, "-c", f"import sys\nsys.path.insert(0, {TESTS_DIR!r})\n{script}"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"},
                          cwd=os.path.dirname(TESTS_DIR), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# The sm_90 gate: every kernel config the autotuner may pick, compiled as a launch would specialise it
# ----------------------------------------------------------------------------------------------------------------
# Pointer arguments (``X_ptr``, keyed by X) not in the inputs' dtype.
_POINTER_DTYPES = {"Lse": "fp32", "Delta": "fp32", "DLse": "fp32", "Init": "fp32", "E": "fp32", "Partial": "fp32",
                   "W": "fp32", "G": "fp32", "Table": "i32", "Counts": "i32", "Readers": "i32", "ReaderPtr": "i32",
                   "BlockOrder": "i32"}
# Integer arguments a launch on 16-element aligned rows sees as multiples of 16 (Triton specialises them).
_ALIGNED_INTS = {"pred_sb", "pred_st", "target_sb", "target_st", "N", "CHUNK"}
_FP32_SCALARS = {"qk_scale", "softmax_scale"}
H100_SHARED_MEMORY = 232448  # bytes per block (opt-in) on H100 / H200


def _is_pointer(name: str) -> bool:
    return name.endswith("_ptr")  # the naming rule of every kernel's pointer arguments


def launch_signature(fn, dtype: str, constexprs: dict, pointer_dtypes: dict):
    """(signature, attrs, constexprs) of ``fn`` as a launch on 16-byte aligned tensors specialises it: unit inner
    strides become the constant 1, pointers and the outer strides are 16-divisible."""
    consts = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.startswith("stride_") and (name.endswith("d") or name in ("stride_ti", "stride_glm")):
            consts[name] = 1
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name.startswith("stride_") or not _is_pointer(name):
            signature[name] = "fp32" if name in _FP32_SCALARS else "i32"
            if (name.startswith("stride_") and name != "stride_tb") or name in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        base = name[:-len("_ptr")] if name.endswith("_ptr") else name
        signature[name] = "*" + pointer_dtypes.get(base, _POINTER_DTYPES.get(base, dtype))
        attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs, consts


class _ShapeOnly:
    """What an ``early_config_prune`` reads of a tensor argument."""

    def __init__(self, dtype: str):
        self._size = {"fp32": 4, "i32": 4}.get(dtype, 2)
        self.device = type("Device", (), {"index": 0, "type": "cuda"})()

    def element_size(self) -> int:
        return self._size


def autotuner_choices(kernel, dtype: str, constexprs: dict):
    """The configs an autotuned launch may time or take, in order (the kernel's own prune, on an H100's shared
    memory; the first is what ``KVPO_TRITON_AUTOTUNE=0`` takes), as (kwargs, num_warps, num_stages) tuples."""
    configs = kernel.configs
    if kernel.early_config_prune is not None:
        named = {name: _ShapeOnly(_POINTER_DTYPES.get(name.replace("_ptr", ""), dtype))
                 for name in kernel.fn.arg_names if _is_pointer(name)}
        configs = kernel.early_config_prune(configs, named, **constexprs)
    return [(c.kwargs, c.num_warps, c.num_stages) for c in configs]


def compile_job(job: dict) -> dict:
    """Compile one (kernel, variant, config) job; return its row of the compile facts."""
    import importlib

    import triton
    import triton.language as tl

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    kwargs, num_warps, num_stages = job["config"]
    constexprs = {**job["constexprs"], **kwargs}
    if constexprs.get("ACC") == "fp32":  # tl dtypes do not pickle across the worker processes
        constexprs["ACC"] = tl.float32
    signature, attrs, consts = launch_signature(fn, job["dtype"], constexprs, job["pointers"])
    facts = compile_for_sm90(fn, signature, attrs, consts, num_warps=num_warps, num_stages=num_stages)
    facts.pop("ptx")
    config = " ".join(f"{k}={v}" for k, v in kwargs.items()) + f" w{num_warps} s{num_stages}"
    return {key: job[key] for key in ("name", "variant", "dtype", "head_dim", "first", "matmul")} | {
        "config": config, **facts}


def _routed_attention_jobs(dtype: str, head_dim: int):
    import kvpo_kernels.triton.routed_attention as ra
    import kvpo_kernels.triton.routed_attention_tma as tma

    common = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, PRECISION="tf32")
    new = [{"HAS_NEW": False}, {"HAS_NEW": True}]
    kernels = [("fwd", ra, "_routed_attention_fwd_kernel", new), ("dq", ra, "_routed_attention_dq_kernel", new),
               ("dkdv_pool", ra, "_routed_attention_dkdv_pool_kernel", [{}]),
               ("dkdv_new", ra, "_routed_attention_dkdv_new_kernel", [{}]),
               ("tma_fwd", tma, "_routed_attention_fwd_tma_kernel",
                [{"RESUME": False, "TABLE_WIDTH": 32}, {"RESUME": True, "TABLE_WIDTH": 1}])]
    for name, module, attr, variants in kernels:
        for variant in variants:
            constexprs = {**common, **variant}
            for index, config in enumerate(autotuner_choices(getattr(module, attr), dtype, constexprs)):
                yield dict(name=name, module=module.__name__, kernel=attr, constexprs=constexprs, config=config,
                           first=index == 0, matmul=True, dtype=dtype, head_dim=head_dim, pointers={},
                           variant=" ".join(f"{k}={int(v)}" for k, v in variant.items() if k != "TABLE_WIDTH"))
    # The delta kernel's one launch config (BLOCK_M = 64, Triton's default warps and stages).
    yield dict(name="delta", module=ra.__name__, kernel="_delta_kernel", config=({"BLOCK_M": 64}, 4, 3),
               constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, HAS_DLSE=True), first=True, matmul=False,
               dtype=dtype, head_dim=head_dim, pointers={}, variant="HAS_DLSE=1")


def _velocity_energy_jobs(dtype: str):
    """velocity_energy's launch configs (fixed in its launchers: 8 warps, BLOCK = _MAX_BLOCK; the combine runs on
    fp32 partial sums with 4 warps, whatever the inputs' dtype: listed once, under fp32)."""
    import kvpo_kernels.triton.velocity_energy as ve

    module = ve.__name__
    common = dict(HAS_WEIGHT=True, MEAN=True, BLOCK=ve._MAX_BLOCK, ACC="fp32")
    jobs = [("forward", "_velocity_energy_forward_kernel", dict(common, FINAL=final), f"FINAL={int(final)}",
             {"Out": "fp32"}, ({}, 8, 3)) for final in (True, False)]
    jobs.append(("backward", "_velocity_energy_backward_kernel", dict(common, WRITE_PRED=True, WRITE_TARGET=True),
                 "WRITE_PRED=1 WRITE_TARGET=1", {}, ({}, 8, 3)))
    for name, attr, constexprs, variant, pointers, config in jobs:
        yield dict(name=f"ve_{name}", module=module, kernel=attr, constexprs=constexprs, config=config, first=True,
                   matmul=False, dtype=dtype, head_dim=None, pointers=pointers, variant=variant)
    if dtype == "bf16":
        yield dict(name="ve_combine", module=module, kernel="_velocity_energy_combine_kernel", config=({}, 4, 3),
                   constexprs=dict(HAS_WEIGHT=True, MEAN=True, ROWS_BLOCK=16, SPLITS_BLOCK=ve._MAX_SPLITS),
                   first=True, matmul=False, dtype="fp32", head_dim=None, pointers={}, variant="SPLITS_BLOCK=1024")


def gate_jobs():
    """Every kernel variant and config the sm_90 gate compiles, at bf16 and fp16, D = 64 and 128."""
    import types

    import torch

    os.environ["KVPO_TRITON_AUTOTUNE"] = "1"  # the prunes then keep every config the autotuner may time
    torch.cuda.get_device_properties = lambda index: types.SimpleNamespace(
        shared_memory_per_block_optin=H100_SHARED_MEMORY, multi_processor_count=132)
    jobs = []
    for dtype in ("bf16", "fp16"):
        for head_dim in (64, 128):
            jobs += _routed_attention_jobs(dtype, head_dim)
        jobs += _velocity_energy_jobs(dtype)
    return jobs


def gate_facts(workers: int = 2) -> dict:
    """Compile every gate job (``workers`` processes); return the toolchain versions and one row per job."""
    import concurrent.futures

    import triton

    jobs = gate_jobs()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(compile_job, jobs))
    ptxas = subprocess.run([nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    return {"triton": triton.__version__, "ptxas": ptxas.strip().splitlines()[-1], "target": "sm_90", "rows": rows}
