"""The package's shape, as the README states it: one installed namespace (`qlora`), every module listed
in the layout page (docs/layout.md), and every private library name the package uses listed there too, with
the behaviour each relies on pinned here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("qlora", "tasks", "flows")  # qlora/ holds the CLI and qlora/runtime/


def _layout_section(heading: str) -> str:
    text = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    end = re.compile(r"\n#{2,3} ").search(text, start + len(heading) + 2)
    return text[start:end.start() if end else len(text)]


def _modules() -> set[str]:
    """The package's source files (an empty __init__.py says nothing worth a line)."""
    return {str(p.relative_to(REPO)) for folder in PACKAGE_FOLDERS for p in (REPO / folder).rglob("*.py")
            if "__pycache__" not in p.parts and (p.name != "__init__.py" or p.read_text().strip())}


def test_the_layout_page_lists_every_module_once():
    block = _layout_section("## Modules").split("```")[1]
    listed = [line.split()[0] for line in block.strip().splitlines()]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == _modules(), (f"not listed: {sorted(_modules() - set(listed))}; "
                                       f"listed but absent: {sorted(set(listed) - _modules())}")


# A private name of a library (or of the standard library) used by the package: `lib.x._name`,
# `from lib.x import _name`, `import lib._x`, or a private environment variable (double underscore).
LIBRARIES = r"(?:torch|dist|prefect|mlflow|transformers|peft|bitsandbytes|bnb|liger_kernel|os|sys|threading|atexit|gc)"
PRIVATE_USE = re.compile(rf"\b{LIBRARIES}(?:\.\w+)*?\.(_[a-zA-Z]\w*)|"
                         rf"^\s*from\s+{LIBRARIES}[\w.]*\s+import\s+(_[a-zA-Z]\w*)|"
                         r"\b([A-Z]+__[A-Z_]+)\b", re.M)


def _private_uses() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for module in _modules():
        for match in PRIVATE_USE.finditer((REPO / module).read_text(encoding="utf-8")):
            name = next(g for g in match.groups() if g)
            if not name.startswith("__"):
                found.setdefault(name, set()).add(module)
    return found


def test_every_private_library_name_the_package_uses_is_named_in_the_layout_page():
    uses = _private_uses()
    assert "_abort_process_group" in uses  # the scan sees what it is meant to see
    section = _layout_section("## Private library pieces we rely on")
    unlisted = {name: sorted(where) for name, where in uses.items() if name not in section}
    assert not unlisted, f"private names used but not named in docs/layout.md: {unlisted}"


def test_the_scan_catches_each_kind_of_private_use(tmp_path):
    samples = ["threading._shutdown()", "from mlflow.data.dataset import _x", "import torch._dynamo",
               'env["PREFECT__SERVER_FINAL"] = "1"', "ds._to_mlflow_entity()"]
    assert [bool(PRIVATE_USE.search(s)) for s in samples] == [True, True, True, True, False]
    # the last one is a method of an object, not a library name: the import-level check is the
    # pinned list, and MLflow objects are reached only through their public methods (a grep below)
    assert not re.search(r"\._to_mlflow_entity|_build_info|PREFECT__|threading\._|atexit\._",
                         "\n".join((REPO / m).read_text() for m in _modules()))


def test_the_training_engine_imports_without_prefect():
    probe = "import sys, qlora.tasks.training.trainer; print(sorted(m for m in ('prefect', 'flows') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


# --- what the listed pieces do, pinned ---------------------------------------------------------

def test_torch_aborts_a_process_group_by_the_private_name_we_call():
    import torch.distributed as dist

    assert callable(dist.distributed_c10d._abort_process_group)


def test_torch_foreach_div_divides_every_tensor_in_place():
    import torch

    grads = [torch.full((3,), 4.0), torch.full((2, 2), 8.0)]
    torch._foreach_div_(grads, 2.0)
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[1], torch.full((2, 2), 4.0))


def test_inductor_and_functorch_configs_have_what_compiled_layers_set():
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.compile_fx import compile_fx

    assert callable(compile_fx)
    with torch._functorch.config.patch(cse=False):
        assert torch._functorch.config.cse is False
    assert hasattr(torch._inductor.config, "deterministic")


def test_mkldnn_says_whether_this_cpu_computes_bfloat16():
    import torch

    assert isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool)


def test_os_exit_is_there():
    assert callable(os._exit)


def test_bitsandbytes_cuda_dequantize_into_a_buffer_where_cuda_is():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' CUDA backend loads only with CUDA (the fused layer then uses the public op)")
    from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl

    assert callable(_dequantize_4bit_impl)


def test_liger_applies_its_kernels_to_a_loaded_instance_where_installed():
    monkey_patch = pytest.importorskip("liger_kernel.transformers.monkey_patch")
    assert callable(monkey_patch._apply_liger_kernel_to_instance)


# --- one installed namespace ---------------------------------------------------------------------

@pytest.mark.slow  # builds a wheel and a virtual environment: several processes
def test_the_wheel_installs_one_top_level_package(tmp_path):
    """Built as a user's pip builds it, then installed into a fresh virtual environment: `qlora` is the
    only importable name it adds (with its stages and flows inside), nothing bare `tasks` or `flows`."""
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "qlora", "tasks", "flows", "recipes"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("qlora_pipeline-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist() if ".dist-info" not in name.split("/")[0]
                and ".data" not in name.split("/")[0]}
        assert {"qlora/tasks/training/trainer.py", "qlora/runtime/signals.py", "qlora/flows/finetune.py", "qlora/tasks/metrics/accuracy.py"} <= set(
            archive.namelist())
    assert tops == {"qlora"}, tops
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    before = {p.name for p in Path(site).iterdir()}
    installed = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    added = {p.name for p in Path(site).iterdir()} - before
    added = {name for name in added if not name.endswith(".dist-info")}
    assert added == {"qlora"}, added
    probe = ("import importlib.util as u; print([n for n in ('tasks', 'flows') if u.find_spec(n)], "
             "bool(u.find_spec('qlora.tasks.training.trainer')), bool(u.find_spec('qlora.flows.finetune')))")
    done = subprocess.run([venv / "bin" / "python", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.stdout.split() == ["[]", "True", "True"], done.stderr[-2000:]
