"""Reading torch checkpoint files safely: `weights_only=True`, wrappers unwrapped, DataParallel's
`module.` prefix dropped; every failure names the file."""

from __future__ import annotations

import pickle

import torch

from storage.locations import StoragePath, as_path, location


def read_state_dict(path: StoragePath | str, error: type[Exception],
                    wrappers: tuple[str, ...] = ("model", "state_dict"),
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, the file's other top-level entries). A pickle that needs more than tensors and
    plain containers is refused, never executed."""
    path = as_path(path)
    if not path.is_file():
        raise error(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(location(path).file_for_whole_read(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise error(f"{path}: refused: loading it would need more than plain tensors "
                    f"(weights_only=True): {str(e).splitlines()[0]}") from e
    except Exception as e:  # zip errors, truncated files, not a torch file at all
        raise error(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], dict):
        obj = obj[0]  # e.g. the DDIM repo's training checkpoints: [state_dict, optimizer, ...]
    meta: dict = {}
    if isinstance(obj, dict):
        for key in wrappers:
            if isinstance(obj.get(key), dict):
                meta = {k: v for k, v in obj.items() if k != key}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, meta
