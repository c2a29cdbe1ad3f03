"""Where a pipeline's files are: a local folder, or a hub repo id downloaded when online."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jdit.files import read_json_object

# What a text-to-image pipeline needs from a repo (fp32 / fp16 safetensors, configs, tokenizer).
ALLOW_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.json",
                  "*/spiece.model", "*/tokenizer.json", "scheduler/*"]


def resolve(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local pipeline folder: ``path_or_repo_id`` itself when it is a directory, else the
    snapshot of that hub repo (``huggingface_hub``; cached, so later calls work offline)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if name.count("/") != 1 or path.exists():
        raise FileNotFoundError(f"{name!r} is neither a pipeline folder nor a hub repo id "
                                f"('owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"{name!r} is not a local folder; downloading it needs huggingface_hub:"
                          f' pip install "jdit[pipelines]"') from e
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo: one clear message
        raise OSError(
            f"could not fetch the hub repo {name!r} ({type(e).__name__}: {e}). Offline? Download it"
            f" where there is a network (`huggingface-cli download {name}`) and pass the folder, "
            f"or set HF_HUB_OFFLINE=1 to use the local cache") from e


def model_index(folder: Path) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (class name and components), validated."""
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline "
                                f"folder (for a single model use jdit.models.from_pretrained)")
    data = read_json_object(index)
    if "_class_name" not in data:
        raise ValueError(f"{index}: no _class_name")
    return data
