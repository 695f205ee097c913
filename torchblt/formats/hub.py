"""Hugging Face Hub download (``huggingface_hub.snapshot_download``) with clear offline errors."""

from __future__ import annotations

from pathlib import Path

from torchblt.formats.common import CheckpointError


def download(repo_id: str, revision: str | None = None) -> Path:
    """Local folder of ``repo_id`` (from the cache when offline, else downloaded)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from e
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not a local folder, and the Hugging Face Hub cannot be reached (offline or "
            "HF_HUB_OFFLINE=1) with no cached copy. Download it where there is network "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR."
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: Hugging Face Hub error: {str(e).splitlines()[0]}") from None
    except Exception as e:  # connection errors come in many types (requests/httpx)
        raise CheckpointError(
            f"{repo_id}: could not download from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "If you are offline, download the folder elsewhere and pass its path."
        ) from None
