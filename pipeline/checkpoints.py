"""Loading the published checkpoints safely, and describing them for output metadata.

A source is a hub id (`MIT/ast-finetuned-audioset-10-10-0.4593`), a local directory written by
`save_pretrained`, or such a directory in object storage (s3://, gs://, az://). Weights load from safetensors only and remote code is never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)

DEFAULT_AST = "MIT/ast-finetuned-audioset-10-10-0.4593"
DEFAULT_CLAP = "laion/clap-htsat-unfused"
DEFAULT_PROMPT = "This is a sound of {label}."   # CLAP text prompt for a label (zero-shot, calibration)
SAFE_LOAD = {"use_safetensors": True, "trust_remote_code": False}


@dataclass(frozen=True)
class ModelInfo:
    """What produced a column: checkpoint source, revision (hub commit or weights hash), untrained flag."""

    source: str
    revision: str
    untrained: bool

    def to_dict(self) -> dict:
        return {"source": self.source, "revision": self.revision, "untrained": self.untrained}


def cache_dir() -> Path:
    """Where checkpoints from object storage are kept, one copy per node ($AUDIO_TAGGING_CACHE)."""
    return Path(os.environ.get("AUDIO_TAGGING_CACHE", Path.home() / ".cache" / "audio-tagging"))


def is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def resolve(source: str) -> str:
    """A path from_pretrained can load: hub ids and local dirs as given; object-storage checkpoints
    (s3://bucket/models/ast/) downloaded once per node, under a lock so that actors starting together
    download once and never see a half-copied directory."""
    if not is_remote(source):
        return source
    from filelock import FileLock

    target = cache_dir() / "checkpoints" / hashlib.sha256(source.encode()).hexdigest()[:20]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").exists():
            fs, path = fsspec.core.url_to_fs(source)
            files = _checkpoint_files(source, path, fs.find(path))
            partial = target.with_name(target.name + ".partial")
            if partial.exists():
                _remove_tree(partial)
            partial.mkdir()
            for remote, relative in files:
                local = partial / relative
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
            (partial / ".complete").write_text(source + "\n")
            partial.rename(target)
            log.info("downloaded checkpoint %s to %s", source, target)
    return str(target)


def _checkpoint_files(source: str, root: str, remotes: list[str]) -> list[tuple[str, str]]:
    """(remote key, relative local path) for each object under a checkpoint prefix. Object keys may
    hold `..` or a leading `/`; such a checkpoint is refused before anything is written, since joined
    onto the cache path those names would land outside it."""
    prefix = root.rstrip("/") + "/"
    files = []
    for remote in remotes:
        relative = remote[len(prefix):] if remote.startswith(prefix) else None
        parts = relative.split("/") if relative else []
        if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in relative:
            raise ValueError(f"checkpoint {source}: object key {remote!r} escapes the checkpoint "
                             "directory; refusing to download it")
        files.append((remote, relative))
    return files


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


class CheckpointError(ValueError):
    """A model source that cannot be loaded: missing, unreadable, not a checkpoint of the expected kind,
    or without safetensors weights. Raised before any work starts (jobs exit 2, README)."""


@contextlib.contextmanager
def loading(kind: str, source: str):
    """Turn the loaders' errors for `source` into one CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot load the {kind} checkpoint {source!r}: {reason}") from e


def describe(source: str) -> ModelInfo:
    """Identify a checkpoint (as named by the user) without loading its weights."""
    local = resolve(source)
    config = model_config(source)
    if os.path.isdir(local) and not any(n.endswith(".safetensors") for n in os.listdir(local)):
        raise CheckpointError(f"the checkpoint {source!r} has no .safetensors weights (only safetensors load)")
    if os.path.isdir(local):
        revision = "sha256:" + _weights_digest(local)
        untrained = os.path.exists(os.path.join(local, "UNTRAINED.txt"))
    else:
        revision = getattr(config, "_commit_hash", None) or "unknown"
        untrained = False
    return ModelInfo(source=source, revision=revision, untrained=untrained)


def _weights_digest(directory: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith((".safetensors", ".json")):
            with open(os.path.join(directory, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def load_ast(source: str):
    """ASTForAudioClassification in eval mode, on CPU."""
    from transformers import ASTForAudioClassification

    return ASTForAudioClassification.from_pretrained(resolve(source), **SAFE_LOAD).eval()


def load_clap(source: str):
    """ClapModel in eval mode, on CPU."""
    from transformers import ClapModel

    return ClapModel.from_pretrained(resolve(source), **SAFE_LOAD).eval()


def model_config(source: str):
    """The checkpoint's transformers config (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(source), trust_remote_code=False)


def label_names(source: str) -> list[str]:
    """AST label names in logit order, from the checkpoint's config.id2label."""
    config = model_config(source)
    return [config.id2label[i] for i in range(config.num_labels)]
