"""Loading the published checkpoints safely, and describing them for output metadata.

A source is a hub id (`MIT/ast-finetuned-audioset-10-10-0.4593`) or a local directory written by
`save_pretrained`. Weights load from safetensors only and remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_AST = "MIT/ast-finetuned-audioset-10-10-0.4593"
DEFAULT_CLAP = "laion/clap-htsat-unfused"
SAFE_LOAD = {"use_safetensors": True, "trust_remote_code": False}


@dataclass(frozen=True)
class ModelInfo:
    """What produced a column: checkpoint source, revision (hub commit or weights hash), untrained flag."""

    source: str
    revision: str
    untrained: bool

    def to_dict(self) -> dict:
        return {"source": self.source, "revision": self.revision, "untrained": self.untrained}


def describe(source: str) -> ModelInfo:
    """Identify a checkpoint without loading its weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    if os.path.isdir(source):
        revision = "sha256:" + _weights_digest(source)
        untrained = os.path.exists(os.path.join(source, "UNTRAINED.txt"))
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

    return ASTForAudioClassification.from_pretrained(source, **SAFE_LOAD).eval()


def load_clap(source: str):
    """ClapModel in eval mode, on CPU."""
    from transformers import ClapModel

    return ClapModel.from_pretrained(source, **SAFE_LOAD).eval()


def label_names(source: str) -> list[str]:
    """AST label names in logit order, from the checkpoint's config.id2label."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    return [config.id2label[i] for i in range(config.num_labels)]
