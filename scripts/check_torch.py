"""Fail (exit 1, one line) unless the installed torch is the build the set-up asked for.

`make setup` installs TORCH_SPEC (a CPU build by default) together with the project, so no
other requirement can swap it. This check keeps it that way: the version must satisfy the
spec, and on a machine without an NVIDIA GPU it must be a CPU build (no CUDA runtime, no
nvidia-* wheels: gigabytes nobody asked for).

    python scripts/check_torch.py "torch==2.13.0"
"""

from __future__ import annotations

import shutil
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def problems(spec: str, version: str, cuda: str | None, has_gpu: bool,
             nvidia_wheels: list[str]) -> list[str]:
    """What is wrong with the installed torch, given what was asked (empty: nothing)."""
    wanted = Requirement(spec)
    out = []
    if not wanted.specifier.contains(Version(version), prereleases=True):
        out.append(f"torch {version} installed, but TORCH_SPEC asks for {spec}")
    if not has_gpu and cuda is not None:
        out.append(f"torch {version} is a CUDA {cuda} build on a machine without a GPU")
    if not has_gpu and nvidia_wheels:
        out.append(f"{len(nvidia_wheels)} nvidia-* packages installed on a machine without a "
                   f"GPU ({', '.join(sorted(nvidia_wheels)[:3])}, ...)")
    return out


def main(argv: list[str]) -> int:
    import torch

    spec = argv[1] if len(argv) > 1 else "torch"
    nvidia = [d.metadata["Name"] for d in metadata.distributions()
              if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
    found = problems(spec, torch.__version__, torch.version.cuda,
                     has_gpu=shutil.which("nvidia-smi") is not None, nvidia_wheels=nvidia)
    if found:
        print(f"check-torch: {'; '.join(found)}; rebuild the venv: rm -rf .venv && make setup",
              file=sys.stderr)
        return 1
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    print(f"torch {torch.__version__} ({build} build) as TORCH_SPEC={spec} asks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
