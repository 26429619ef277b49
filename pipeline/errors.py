"""The errors a user can cause and fix (bad inputs, missing folders, mismatched configs).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from stages.classifier import CheckpointError
from stages.noise_model import ModelError
from stages.shard import ShardError
from stages.train import TrainError
from storage.cache_folder import CacheError
from storage.run import RunError

USER_ERRORS: tuple[type[Exception], ...] = (
    ShardError, RunError, CacheError, ModelError, CheckpointError, TrainError, ValueError,
    FileNotFoundError)
