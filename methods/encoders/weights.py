"""Where an encoder's weights come from: `--weights hub | <path> | random`.

hub: the Hugging Face hub through huggingface_hub (token from HF_TOKEN; HF_HUB_OFFLINE honoured, then
only the local cache is used). <path>: a local checkpoint file (.safetensors, .bin, .pth, .pt).
random: no pretrained weights; results are flagged. Every failure is one line that says what to do.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that cannot be had (offline, gated, missing file). One-line message."""


@dataclass(frozen=True)
class WeightsSpec:
    kind: Literal["hub", "path", "random"]
    path: Path | None = None

    def provenance(self, hub_source: str) -> str:
        """The FoldOutput.weights string: 'pretrained:hub:<repo>', 'pretrained:file:<path>' or 'random'."""
        if self.kind == "random":
            return "random"
        if self.kind == "hub":
            return f"pretrained:hub:{hub_source}"
        return f"pretrained:file:{self.path}"


def parse_weights(spec: str | None) -> WeightsSpec:
    """None or 'hub' -> hub; 'random' -> random; anything else is a local checkpoint path."""
    if spec is None or spec == "hub":
        return WeightsSpec("hub")
    if spec == "random":
        return WeightsSpec("random")
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {spec} not found; pass --weights hub, --weights random or an existing checkpoint file")
    return WeightsSpec("path", path)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE from the environment now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


@contextmanager
def hub_errors(repo_id: str, filename: str, gated: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's failures into one-line messages that say what to do instead."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    local_copy = f"pass --weights /path/to/{filename} (a local copy) or --weights random (no pretrained weights; flagged in results)"
    try:
        yield
    except GatedRepoError as err:
        raise WeightsUnavailableError(gated_message(repo_id, filename)) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        # LocalEntryNotFoundError is also what a failed connection ends in (after retries)
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "no connection to huggingface.co"
        raise WeightsUnavailableError(
            f"cannot get {filename} of {repo_id}: {why} and it is not in the local Hugging Face cache; {local_copy}"
        ) from err
    except RepositoryNotFoundError as err:  # what a gated repo answers to a request without a token
        if gated:
            raise WeightsUnavailableError(gated_message(repo_id, filename)) from err
        raise WeightsUnavailableError(f"the Hugging Face repo {repo_id} does not exist or is private; check the name or {local_copy}") from err
    except EntryNotFoundError as err:
        raise WeightsUnavailableError(f"{repo_id} has no file {filename}; {local_copy}") from err
    except (HfHubHTTPError, OSError) as err:  # OSError: connection failures surfacing as such
        raise WeightsUnavailableError(f"cannot download {filename} of {repo_id} ({type(err).__name__}: {first_line(err)}); {local_copy}") from err


def gated_message(repo_id: str, filename: str) -> str:
    return (
        f"no access to the gated model {repo_id}: request access at https://huggingface.co/{repo_id}, then put a "
        f"read token in HF_TOKEN (https://huggingface.co/settings/tokens), or download {filename} and pass "
        f"--weights /path/to/{filename}"
    )


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def hub_file(repo_id: str, filename: str, gated: bool = False) -> Path:
    """Download (or find in the cache) one file of a hub repo. HF_TOKEN is read by huggingface_hub."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, filename, gated):
        return Path(hf_hub_download(repo_id, filename, local_files_only=hub_offline()))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as a flat state dict: unwraps {'state_dict' | 'model' | 'model_state_dict': ...}, strips
    the `module.` prefix that DataParallel / DDP checkpoints carry."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # mmap: a CoCa checkpoint holds text towers we never load into memory
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise WeightsUnavailableError(f"cannot read checkpoint {path} ({type(err).__name__}: {first_line(err)}); pass a .safetensors/.bin/.pth state dict") from err
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return {strip_prefix(k, "module."): v for k, v in state.items()}


def strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with a one-line error that names missing, unexpected and
    wrongly-shaped keys (torch's own message is many lines and stops at the first shape error)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = [f"{label} {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise WeightsUnavailableError(f"checkpoint does not fit {what} ({'; '.join(parts)}); pass the right file or --weights hub")
    tensors = [*module.parameters(), *module.buffers()]
    # a module built on the meta device (no_init) takes the checkpoint's tensors as they are
    module.load_state_dict(state, strict=True, assign=any(t.is_meta for t in tensors))
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError(f"{what} has tensors outside its state dict; build it with random init before loading")


RANDOM_INIT_SEED = 0


@contextmanager
def seeded_init(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Build random-weight encoders from a fixed seed, without touching the caller's RNG: their cached
    features are then the same in every run and job."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def no_init():
    """Build a module that a checkpoint will fill on the meta device: skips random initialisation
    (seconds for a ViT-B) and the memory for a second copy of the weights."""
    return torch.device("meta")
