"""Upload a verified release folder to the Hugging Face Hub (``nox -s publish``, CI's last step).

Needs ``HF_TOKEN`` and ``HF_REPO_PREFIX`` (e.g. ``my-org/``): the repository is
``HF_REPO_PREFIX + <release name>-GGUF``.  The folder is verified against its manifest first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import QuantizeError
from .release import verify


def publish(folder: Path) -> str:
    token, prefix = os.environ.get("HF_TOKEN"), os.environ.get("HF_REPO_PREFIX")
    if not token or not prefix:
        raise QuantizeError(folder, "set HF_TOKEN and HF_REPO_PREFIX to publish to the Hugging Face Hub")
    report = verify(folder)
    if not report.ok:
        raise QuantizeError(folder, "does not match its manifest: " + "; ".join(report.lines()))
    from huggingface_hub import HfApi

    repo = f"{prefix}{folder.name}-GGUF"
    api = HfApi(token=token)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=f"release {folder.name}")
    return repo


def main() -> int:
    try:
        print(publish(Path(sys.argv[1])))
    except QuantizeError as err:
        print(f"quantize: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
