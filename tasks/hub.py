"""Hugging Face Hub access with bounded waits and clear errors (offline machines are common)."""
from __future__ import annotations

import os
from pathlib import Path

from qlora.tasks.recipe import RecipeError

HUB_TIMEOUT_S = 10


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_error(exc: Exception, repo_id: str, field: str) -> RecipeError:
    name = type(exc).__name__
    unreachable = ("Connect", "Timeout", "Offline", "LocalEntryNotFound")
    if any(n in name for n in unreachable) or _offline() or "offline" in str(exc).lower():
        return RecipeError(f"cannot reach the Hugging Face Hub for '{repo_id}' and it is not in the local cache",
                           field, hint="connect to the network once, or use a local path")
    if "RepositoryNotFound" in name or "404" in str(exc):
        return RecipeError(f"'{repo_id}' does not exist on the Hugging Face Hub (or is private)", field)
    return RecipeError(f"cannot fetch '{repo_id}' from the Hugging Face Hub: {str(exc).splitlines()[0]}", field)


def check_hub_repo(repo_id: str, repo_type: str, revision: str | None, field: str) -> None:
    """The repo is in the local cache, or the Hub answers that it exists, within HUB_TIMEOUT_S."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
        return
    except Exception:  # noqa: BLE001 - not cached: ask the Hub
        pass
    try:
        info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
        info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo_id, field) from None


def download_model(repo_id: str, revision: str | None, field: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached yet
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo_id, field) from None


def dataset_commit(repo_id: str, revision: str | None) -> str:
    """The commit a Hub dataset resolves to now (so an updated dataset is a cache miss): asked of
    the Hub, else read from the local cache, else the revision as written."""
    from huggingface_hub import HfApi, snapshot_download

    if not _offline():
        try:
            return HfApi().dataset_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S).sha
        except Exception:  # noqa: BLE001 - unreachable: fall back to the cache
            pass
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001
        return revision or "unresolved"
