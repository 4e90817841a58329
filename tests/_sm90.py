"""Compile Triton kernels for sm_90 on a machine without a GPU, as a launch on an H100/H200 would.

TTIR -> PTX -> cubin with Triton's bundled ptxas: a kernel that only the GPU compiler rejects fails on the CPU, and
the cubin's resource usage (shared memory, register spills) can be checked before any GPU run. The compile must run
with ``TRITON_INTERPRET=0``, which the test process cannot switch back, so each test runs a script in a fresh
process (``run_compile_script``) that calls ``compile_for_sm90``.
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

    Returns shared memory (bytes), register spill stack (bytes; None when Triton ships no cuobjdump), the PTX, and
    what ptxas and the SASS say: ``registers`` per thread, ``spill_bytes`` (spill stores), ``c7515`` (how many
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
    facts = {"shared": compiled.metadata.shared, "stack": None, "ptx": compiled.asm["ptx"],
             "registers": int(re.search(r"Used (\d+) registers", ptxas_log).group(1)),
             "spill_bytes": int(re.search(r"(\d+) bytes spill stores", ptxas_log).group(1)),
             "c7515": len(re.findall(r"C7515", ptxas_log))}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        if os.path.exists(nvidia_tool("cuobjdump")):
            usage = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
            facts["stack"] = int(usage.split("STACK:")[1].split()[0])
        sass = subprocess.run([nvidia_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
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
