"""What a result must carry to be traced back to how it was made."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "timm", "numpy", "scikit-learn", "scikit-survival", "openslide-python", "openslide-bin",
            "h5py", "pandas", "huggingface_hub", "mamba-ssm", "causal-conv1d", "triton")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout, with '+dirty' when tracked files differ from it; 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def device_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def hardware() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"host": platform.node(), "platform": platform.platform(), "cpus": __import__("os").cpu_count(), "gpus": gpus}
