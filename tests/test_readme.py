"""The README tells the truth: its code is what examples/ runs, its links resolve inside the repository, its test
command is what CI runs, its Triton range is pyproject's, and its backends table is what the code accepts."""
import re
import shlex
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import kvpo_kernels
from kvpo_kernels._backends import triton_interpreting

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _dedented_versions(text: str) -> list[str]:
    """The file, and the file with one level (4 spaces) of indentation removed: function bodies as shown."""
    lines = text.splitlines()
    return [text, "\n".join(line[4:] if line.startswith("    ") else line for line in lines)]


def test_every_python_block_is_an_excerpt_of_an_example():
    sources = [version for path in EXAMPLES for version in _dedented_versions(path.read_text())]
    blocks = _blocks("python")
    assert blocks, "the README shows no Python code"
    for block in blocks:
        shown = textwrap.dedent(block).rstrip("\n")
        assert any(shown in source for source in sources), f"README block is not an excerpt of examples/:\n{shown}"


def test_every_example_is_linked():
    for path in EXAMPLES:
        assert f"](examples/{path.name})" in README, f"README does not link examples/{path.name}"


def test_links_stay_inside_the_repository():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert targets
    for target in targets:
        assert "://" not in target, f"README links outside the repository: {target}"
        assert (ROOT / target).exists(), f"README links {target}, which is not in the repository"
    for outside in ("shared notes", "ANCHORS.md", "DESIGN.md"):
        assert outside not in README, f"README points at {outside!r}, which a clone does not have"


def _readme_test_command() -> str:
    commands = [line for block in _blocks("bash") for line in block.splitlines() if "pytest tests" in line]
    assert len(commands) == 1, f"expected one test command in the README, found {commands}"
    return commands[0].strip()


def test_ci_runs_exactly_the_readme_test_command_after_the_cpu_wheel():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = _readme_test_command()
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"
    wheel = "python3 -m pip install -q torch==2.13.0"
    assert wheel in ci_lines and ci_lines.index(wheel) < ci_lines.index(command)


def _triton_requirement() -> Requirement:
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"(triton[^"]*)"', pyproject)
    assert len(found) == 1, f"pyproject.toml must declare triton once, found {found}"
    return Requirement(found[0])


def test_one_triton_range_declared_in_pyproject_and_named_by_the_readme():
    requirement = _triton_requirement()
    named = [Requirement(text) for text in re.findall(r"`(triton[<>=~!][^`]*)`", README)]
    assert any(r.specifier == requirement.specifier for r in named), f"README does not name `{requirement}`"
    commands = "\n".join(_blocks("bash")) + (ROOT / ".ci" / "run").read_text()
    assert "triton==" not in commands and "triton>" not in commands, "a command pins Triton outside pyproject"


def test_installed_triton_is_in_the_declared_range():
    """CI installs into a machine that has Triton 3.6.0: the range must keep it (no upgrade, no rebuild)."""
    version = metadata.version("triton")
    assert _triton_requirement().specifier.contains(version), f"triton {version} is outside the declared range"


# ------------------------------------------------------------------------------------------ the backends table
def _backends_table() -> dict:
    """{(op, backend): cell text} from the README's Backends table."""
    section = README.split("## Backends", 1)[1].split("\n#", 1)[0]
    header, *rows = [line for line in section.splitlines() if line.startswith("| `") or line.startswith("| op")]
    backends = [cell.split()[0] for cell in header.strip("|").split("|")[1:]]
    table = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for backend, cell in zip(backends, cells[1:]):
            table[(cells[0].strip("`"), backend)] = cell
    return table


def _call(op: str, backend: str, dtype: torch.dtype, device: str) -> None:
    if op == "velocity_energy":
        pred = torch.randn(2, 3, 5, dtype=dtype, device=device)
        kvpo_kernels.velocity_energy(pred, torch.randn_like(pred), backend=backend)
    else:
        q = torch.randn(2, 3, 2, 8, dtype=dtype, device=device)
        pool = torch.randn(3, 4, 1, 8, dtype=dtype, device=device)
        table = torch.tensor([[0, 2], [1, 1]], dtype=torch.int32, device=device)
        kvpo_kernels.routed_attention(q, pool, pool, table, k_new=pool[:2], v_new=pool[:2], backend=backend)


def _listed_dtypes(cell: str, interpreted: bool) -> set:
    """The dtype names a cell lists; a Triton cell lists the ones Triton's interpreter runs after
    `TRITON_INTERPRET=1`, so under the interpreter those are the ones checked, and the ones before it otherwise."""
    on_device, _, under_interpreter = cell.partition("TRITON_INTERPRET=1")
    text = under_interpreter if interpreted else on_device
    return {name for name in DTYPES if re.search(rf"\b{name}\b", text)}


CELLS = sorted(_backends_table())


def test_backends_table_covers_every_op_and_backend():
    assert {op for op, _ in CELLS} == {"velocity_energy", "routed_attention"}
    assert {backend for _, backend in CELLS} == {"cuda", "triton", "cpu", "torch"}


@pytest.mark.parametrize("op,backend", CELLS, ids=[f"{op}-{backend}" for op, backend in CELLS])
def test_backends_table_cell_is_what_the_code_accepts(op, backend):
    cell = _backends_table()[(op, backend)]
    device = "cuda" if "CUDA tensors" in cell and torch.cuda.is_available() else "cpu"
    why_not = kvpo_kernels.available_backends(op)[op][backend]
    if why_not is not None and "not implemented" not in cell:
        pytest.skip(f"{backend} cannot run here: {why_not}")
    if device == "cpu" and "CUDA tensors" in cell and not ("TRITON_INTERPRET" in cell and triton_interpreting()):
        pytest.skip("the cell is about CUDA tensors; no CUDA device here")
    listed = _listed_dtypes(cell, interpreted=device == "cpu" and backend == "triton")
    for name, dtype in DTYPES.items():
        if name in listed:
            _call(op, backend, dtype, device)
        else:
            with pytest.raises((TypeError, ValueError)):
                _call(op, backend, dtype, device)


# ------------------------------------------------------------------------------------------ the trainer commands
def _trainer_commands() -> list[list[str]]:
    """Arguments of every kvpo-train / torchrun ... -m kvpo_kernels.trainer.cli line in the README's bash blocks."""
    commands = []
    for line in (line for block in _blocks("bash") for line in block.splitlines()):
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word == "kvpo-train" or (word == "kvpo_kernels.trainer.cli" and words[i - 1] == "-m"):
                tail = words[i + 1:]
                commands.append(tail[:tail.index("&&")] if "&&" in tail else tail)
    return commands


def test_readme_trainer_commands_parse_and_their_configs_validate():
    from kvpo_kernels.trainer.cli import _parser
    from kvpo_kernels.trainer.config import load_config

    commands = _trainer_commands()
    assert any("torchrun" in block for block in _blocks("bash")) and len(commands) >= 4
    for argv in commands:
        args = _parser().parse_args(argv)
        load_config(preset=args.preset, path=args.config, overrides=args.overrides)
