"""Models and adapters named by Hugging Face repo id: fetched with ``huggingface_hub`` when online,
resolved from the local HF cache when offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be
reached.  Only what a release is built from is downloaded (see ``PATTERNS``).
"""

from __future__ import annotations

import re
from pathlib import Path

from quantize.errors import QuantizeError

# huggingface_hub is imported only to fetch: recipes check their revision pins here with the standard
# library alone (`quantize ladder` runs before anything is installed).

# What a release needs from a repo, by what the repo is used as.  Pickled weights (``*.bin``)
# only with the recipe's pickle opt-in (``lora_allow_pickle``).
_CARD = ("README.md", "LICENSE*", "USE_POLICY*")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
PATTERNS: dict[str, tuple[str, ...]] = {
    "base": ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", *_TOKENIZER, *_CARD),
    "lora": ("adapter_config.json", "adapter_model.safetensors", *_TOKENIZER, *_CARD),
}
PICKLE_PATTERNS: dict[str, tuple[str, ...]] = {"base": (), "lora": ("adapter_model.bin",)}

REVISION = re.compile(r"[0-9a-f]{40}|[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")  # a commit sha, or a branch or tag name


def check_revision(revision: str) -> str | None:
    """None when ``revision`` is a valid Hub revision (commit sha, branch or tag), else the problem."""
    if REVISION.fullmatch(revision) is None or ".." in revision:
        return f"{revision!r} is not a commit sha, branch or tag name"
    return None


def fetch(repo_id: str, what: str, recipe: Path, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: main) holding the files a release
    needs: downloaded when the Hub is reachable and not disabled, else taken from the cache."""
    at = f"@{revision}" if revision else ""
    if what not in PATTERNS:
        raise QuantizeError(recipe, f"{what} '{repo_id}' is not a local file; only the base model and the LoRA adapter "
                                    "can be Hugging Face repo ids")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    patterns = [*PATTERNS[what], *(PICKLE_PATTERNS[what] if allow_pickle else ())]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise QuantizeError(recipe, f"{what} '{repo_id}{at}': the Hub has no such revision") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(recipe, f"{what} '{repo_id}{at}': not in the Hugging Face cache and not downloadable ({reason}); "
                                    "run once with the Hub reachable, or point the recipe at a local folder") from None


def snapshot_revision(folder: Path) -> str | None:
    """The commit sha of a Hugging Face cache snapshot folder (``…/snapshots/<sha>``), else None."""
    return folder.name if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


def source_record(spec: str, folder: Path, pinned: str | None) -> dict[str, str | None]:
    """What a manifest says of a model input: the recipe's reference, the revision it pinned, and the
    commit it resolved to (None for a local folder)."""
    return {"spec": spec, "pinned": pinned, "commit": snapshot_revision(folder)}
