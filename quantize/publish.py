"""Upload a verified release folder to the Hugging Face Hub (``quantize publish``, run by ``nox -s publish`` as CI's last step).

Needs ``HF_TOKEN`` and ``HF_REPO_PREFIX`` (e.g. ``my-org/``): the repository is
``HF_REPO_PREFIX + <release name>-GGUF``.  The folder is verified against its manifest first, and
only the files the manifest lists (plus the manifest and ``SHA256SUMS``) are uploaded.  The upload
is huggingface_hub's ``upload_folder``, which since huggingface_hub 2 is the large-folder upload
(``upload_large_folder`` was folded into it): with ``hf_xet`` installed, as huggingface_hub
installs it on x86-64 and arm64, files are streamed, committed in batches below the Hub's limits,
and an interrupted upload resumes when run again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi

from quantize.errors import QuantizeError
from quantize.release import MANIFEST, SUMS, verify


@dataclass(frozen=True)
class Upload:
    repo_id: str
    folder: Path
    allow_patterns: tuple[str, ...]  # every file of the release, by its path in the folder
    commit_message: str


def plan(folder: Path) -> Upload:
    """What ``publish`` uploads, after checking the folder against its manifest."""
    prefix = os.environ.get("HF_REPO_PREFIX")
    if not prefix:
        raise QuantizeError(folder, "set HF_REPO_PREFIX (e.g. my-org/) to name the Hugging Face repository")
    report = verify(folder)
    if not report.ok:
        raise QuantizeError(folder, "does not match its manifest: " + "; ".join(report.lines()))
    manifest = json.loads((folder / MANIFEST).read_text())
    files = [f["name"] for a in manifest["artifacts"] for f in a["files"]] + [manifest["card"]["name"], MANIFEST, SUMS]
    return Upload(f"{prefix}{folder.name}-GGUF", folder, tuple(sorted(set(files))), f"release {folder.name}")


def publish(folder: Path) -> str:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise QuantizeError(folder, "set HF_TOKEN to publish to the Hugging Face Hub")
    up = plan(folder)

    api = HfApi(token=token)
    api.create_repo(up.repo_id, exist_ok=True)
    api.upload_folder(repo_id=up.repo_id, folder_path=str(up.folder), allow_patterns=list(up.allow_patterns),
                      commit_message=up.commit_message)
    return up.repo_id
