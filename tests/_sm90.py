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
    """Compile ``fn`` (a ``triton.jit`` function) for sm_90; return its shared memory (bytes), register spill stack
    (bytes; None when Triton ships no cuobjdump) and PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    stack = None
    cuobjdump = nvidia_tool("cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        stack = int(usage.split("STACK:")[1].split()[0])
    return {"shared": compiled.metadata.shared, "stack": stack, "ptx": compiled.asm["ptx"]}


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
