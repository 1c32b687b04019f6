"""Uploading a finished adapter to the Hugging Face Hub (`finetune --push-to-hub`).

The access is checked before any work, so that a run that cannot upload never trains first."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from lora_one.core.errors import UsageError
from lora_one.core.files import ADAPTER
from lora_one.core.save import SIDECAR

# What is uploaded from a run folder: the adapter and its sidecar, nothing of the run's own files.
UPLOADED = (ADAPTER.marker, *ADAPTER.stale, SIDECAR, "README.md")


def check_hub_access() -> None:
    """Refuse --push-to-hub offline or without a login, with the fix."""
    if constants.HF_HUB_OFFLINE:
        raise UsageError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set; unset it when online, or drop "
                         "--push-to-hub and upload the adapter folder later (hf upload REPO OUT).")
    try:
        HfApi().whoami()
    except (HfHubHTTPError, OSError) as e:
        raise UsageError(f"--push-to-hub: the Hub cannot be reached or you are not logged in ({type(e).__name__}); "
                         "run `hf auth login` when online, or drop --push-to-hub.") from None


def push_adapter(folder: Path, repo_id: str) -> str:
    """Upload the adapter files of `folder` to the model repository `repo_id` (made if new); its URL."""
    api = HfApi()
    repo = api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), allow_patterns=list(UPLOADED),
                      commit_message="lora-one finetune")
    return str(repo)
