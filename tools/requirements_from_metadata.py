"""Prints an installed distribution's requirements, one per line, as pip reads them, leaving out torch.

    python tools/requirements_from_metadata.py pivot_mega gpu > requirements.txt

Used by the Dockerfile: the package goes in with ``pip install --no-deps``, then its pins (and those of
the named extras) without torch, whose CUDA build the base image provides. Environment markers are
evaluated here, so the output holds only what applies to this machine.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

KEEP_FROM_IMAGE = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton)$", re.IGNORECASE)


def requirements(dist: str, extras: list[str]) -> list[str]:
    out = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if KEEP_FROM_IMAGE.match(req.name):
            continue
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ["", *extras]):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} DIST [EXTRA ...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
