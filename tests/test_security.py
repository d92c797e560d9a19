"""Security, hostile checkpoints: weights load from safetensors only (a pickle is never unpickled),
remote code in a checkpoint is never imported, and a checkpoint in object storage cannot write outside
the local cache however its keys are named."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from pipeline.checkpoints import load_ast, load_clap, model_config, resolve
from pipeline.retrieval.encoders import TextEncoder


class _Trap:
    """Unpickling this creates `marker`: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(source: str, target: Path, marker: Path) -> Path:
    """A copy of a checkpoint whose weights exist only as a booby-trapped pickle."""
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    with open(target / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Trap(marker)}, f)
    return target


def _with_remote_code(source: str, target: Path, marker: Path) -> Path:
    """A copy of a checkpoint whose config and tokenizer point at Python code shipped beside them."""
    shutil.copytree(source, target)
    (target / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import PretrainedConfig as EvilConfig\n"
                                    "from transformers import PreTrainedModel as EvilModel\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    for name in ("config.json", "tokenizer_config.json"):
        path = target / name
        if path.exists():
            data = json.loads(path.read_text())
            data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                         "AutoModelForAudioClassification": "evil.EvilModel",
                         "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
            path.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("kind", ["ast", "clap"])
def test_pickle_weights_are_refused_and_never_unpickled(kind, checkpoints, tmp_path):
    marker = tmp_path / "unpickled"
    source = str(_pickle_only(checkpoints[kind], tmp_path / kind, marker))
    loaders = [load_ast] if kind == "ast" else [load_clap, TextEncoder]  # the job's and the search's
    for loader in loaders:
        with pytest.raises(OSError, match="safetensors"):
            loader(source)
    assert not marker.exists(), "a checkpoint pickle was unpickled"


@pytest.mark.parametrize("kind", ["ast", "clap"])
def test_remote_code_in_a_checkpoint_is_never_imported(kind, checkpoints, tmp_path):
    marker = tmp_path / "imported"
    source = str(_with_remote_code(checkpoints[kind], tmp_path / kind, marker))
    model = (load_ast if kind == "ast" else load_clap)(source)
    assert type(model).__module__.startswith("transformers.models."), type(model)
    assert type(model_config(source)).__module__.startswith("transformers.models.")
    if kind == "clap":
        encoder = TextEncoder(source)
        assert type(encoder.tokenizer).__module__.startswith("transformers."), type(encoder.tokenizer)
    assert not marker.exists(), "remote code shipped with a checkpoint was imported"


def test_object_storage_keys_cannot_escape_the_checkpoint_cache(checkpoints, tmp_path, monkeypatch):
    """Keys with `..` (legal in S3) would otherwise be joined onto the cache path and written outside it."""
    import boto3

    from tests.s3 import MotoS3

    with MotoS3() as server:
        for name, value in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AUDIO_TAGGING_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=server.endpoint)
        s3.create_bucket(Bucket="models")
        for path in Path(checkpoints["ast"]).iterdir():
            s3.put_object(Bucket="models", Key=f"ast/{path.name}", Body=path.read_bytes())
        s3.put_object(Bucket="models", Key="ast/../../../../escaped.txt", Body=b"outside")
        s3.put_object(Bucket="models", Key="ast/sub/../../../../escaped2.txt", Body=b"outside")
        with pytest.raises(ValueError, match="escapes"):
            resolve("s3://models/ast")
    assert not list(tmp_path.rglob("escaped*")), "a checkpoint key was written outside the cache"
    cached = [p for p in (tmp_path / "cache" / "checkpoints").iterdir() if p.is_dir()]
    assert not cached, f"a refused checkpoint was cached: {cached}"
