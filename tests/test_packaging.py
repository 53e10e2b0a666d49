"""Packaging: presets and kernels ship inside ``pivot_mega`` and resolve the same from the repository,
the editable install and a wheel; nothing installs as a top-level ``kernels`` (Hugging Face's name)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import pivot_mega.kernels
from pivot_mega.presets import MODEL_PRESETS, model_preset_path, presets_dir

REPO = Path(__file__).resolve().parents[1]
# What the wheel is not built from: environments, outputs, and build/ (an older layout's build/lib
# would go into the wheel). Top-level names only: pivot_mega/data is a package.
NOT_SOURCES = {".git", ".venv", "build", "dist", "runs", "logs", "data", ".pytest_cache"}


def _not_sources(directory: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return ignored | (NOT_SOURCES & set(names) if Path(directory) == REPO else set())


# Run in a fresh interpreter: where pivot_mega, its kernels and its presets come from, and whether a
# top-level `kernels` is importable (it must not be ours).
WHERE = """
import importlib.util, json, sys
import pivot_mega, pivot_mega.kernels
from pivot_mega.presets import model_preset_path
top = importlib.util.find_spec("kernels")
print(json.dumps({"pivot_mega": pivot_mega.__file__, "kernels": pivot_mega.kernels.__file__,
                  "tiny": str(model_preset_path("tiny")), "top_level_kernels": top and top.origin,
                  "sys_path": sys.path, "meta_path": [repr(f) for f in sys.meta_path]}))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _is_under(path: str | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root.resolve())


# ------------------------------------------------------------------------------------------------
# The repository and the editable install


def test_presets_and_kernels_resolve_inside_the_package_from_the_repository():
    assert presets_dir() == Path(pivot_mega.__file__).parent / "presets"
    for name in MODEL_PRESETS:
        assert model_preset_path(name).is_file(), name
    assert Path(pivot_mega.kernels.__file__) == REPO / "kernels" / "__init__.py"


def test_every_model_preset_file_has_a_name_and_the_bench_help_lists_them(monkeypatch, capsys):
    assert {p.name for p in presets_dir().glob("model_*.yaml")} == set(MODEL_PRESETS.values())
    from pivot_mega.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no name broken at a hyphen
    parser, _ = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    help_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--preset"))
    words = set(re.split(r"[\s|,()]+", help_line))
    assert set(MODEL_PRESETS) <= words, help_line


def _imported_names(path: Path):
    """Modules and names a file imports (``from . import x`` yields ``x``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
            yield from (alias.name for alias in node.names)


def test_triton_kernels_do_not_import_the_dispatch_back():
    """linear_logprob.py imports triton_linear_logprob.py (on first use) and backend.py; neither imports it."""
    for name in ("triton_linear_logprob.py", "backend.py"):
        names = list(_imported_names(REPO / "kernels" / name))
        assert not [n for n in names if n.split(".")[-1] == "linear_logprob"], (name, names)


def test_editable_install_maps_kernels_under_the_package_only(tmp_path):
    # cwd outside the repository: only the install (its finder) can provide pivot_mega here.
    where = json.loads(_run([sys.executable, "-c", WHERE], cwd=tmp_path, env=_env()).stdout)
    assert Path(where["kernels"]) == REPO / "kernels" / "__init__.py"
    assert Path(where["tiny"]) == REPO / "pivot_mega" / "presets" / "model_tiny.yaml"
    assert not _is_under(where["top_level_kernels"], REPO), where["top_level_kernels"]


# ------------------------------------------------------------------------------------------------
# A wheel, installed on its own


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_presets_and_kernels_inside_the_package(tmp_path):
    source, wheels, target, outside = (tmp_path / d for d in ("source", "wheels", "target", "outside"))
    shutil.copytree(REPO, source, ignore=_not_sources)
    outside.mkdir()
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, source], env=_env())
    (wheel,) = wheels.glob("pivot_mega-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")], "the wheel holds a top-level kernels/ package"
    assert {"pivot_mega/kernels/__init__.py", "pivot_mega/presets/model_tiny.yaml",
            "pivot_mega/presets/models/qwen2.5-1.5b.yaml"} <= set(names)
    _run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", target, wheel], env=_env())
    assert {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} - {"bin"} == {"pivot_mega"}

    # -S: no site module, so no .pth file runs and the editable install's finder stays out; the venv's
    # site-packages (torch, ...) come back through PYTHONPATH, after the wheel's copy.
    site_packages = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = _env(PYTHONPATH=os.pathsep.join([str(target), *site_packages]))
    python = [sys.executable, "-S"]
    where = json.loads(_run([*python, "-c", WHERE], cwd=outside, env=env).stdout)
    assert _is_under(where["pivot_mega"], target), where
    assert _is_under(where["kernels"], target) and Path(where["kernels"]).parent.name == "kernels", where
    assert _is_under(where["tiny"], target), where
    assert where["top_level_kernels"] is None or not _is_under(where["top_level_kernels"], REPO), where
    # The venv may live in the repository; nothing else of it may be on the path.
    assert not [p for p in where["sys_path"] if p and _is_under(p, REPO) and p not in site_packages], where["sys_path"]
    assert not any("editable" in f.lower() for f in where["meta_path"]), where["meta_path"]

    bench = _run([*python, "-m", "pivot_mega.cli", "bench", "--preset", "tiny", "--steps", "1", "--warmup", "0",
                  "--micro-batches", "1"], cwd=outside, env=env, timeout=240)
    assert json.loads(bench.stdout)["preset"] == "tiny"
