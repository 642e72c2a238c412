"""Where a model's weights come from: a Hugging Face id ("owner/name", "owner/name@revision") or a local path.
Shared by the loaders of every backend (pyannote, speechbrain)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

_WEIGHT_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".safetensors")


def looks_like_local_path(source: str) -> bool:
    """A local path (that may not exist), as opposed to a Hugging Face id: absolute or relative path syntax, a
    weights file name, more than one "/", or a Windows separator."""
    return (source.startswith(("/", "./", "../", "~", ".\\")) or source.endswith(_WEIGHT_SUFFIXES)
            or source.count("/") > 1 or "\\" in source)


def split_revision(source: str) -> tuple[str, str | None]:
    """"owner/name@rev" → ("owner/name", "rev"); without "@", the revision is None."""
    repo, _, revision = source.partition("@")
    return repo, revision or None


def redactor(secret: str | None) -> Callable[[str], str]:
    """A function that hides the secret in text (error messages from hubs may echo it)."""
    return (lambda text: text.replace(secret, "***")) if secret else (lambda text: text)


def hub_cache_dir(model_cache_dir: str | Path) -> Path:
    """MODEL_CACHE_DIR as an absolute path: the Hugging Face hub cache every loader downloads into and loads from
    (`models--owner--name/...` inside it). Absolute because SpeechBrain links its files to what the hub returns, and
    a relative link target would resolve against the link's own directory."""
    return Path(model_cache_dir).expanduser().absolute()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (the hub client reads it once, at import; loaders that pass it on read it here)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
