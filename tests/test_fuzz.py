"""Bounded, seeded fuzzing of the inputs from outside: DICOM files (pydicom-data) and PNG/JPEG/BMP images,
mutated (bit flips, truncations, inserted bytes, corrupted header fields), each read through its source in
a worker process with an address-space limit and a per-case time limit. Only BadFrame may come out: no
other exception, no hang, no crash."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
SEED = 20240601
LIMIT_AS = 1536 * 2**20
CASE_S = 2.0
try:
    import data_store

    DATA_STORE = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover
    DATA_STORE = None

DICOM_FILES = (
    "SC_rgb.dcm",
    "SC_rgb_expb_2frame.dcm",
    "SC_ybr_full_uncompressed.dcm",
    "emri_small.dcm",
    "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "color-pl.dcm",
    "liver.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "JPEG-LL.dcm",
)
# (group, element) of image header fields worth corrupting: Rows, Columns, Bits Allocated/Stored,
# Samples per Pixel, Number of Frames, Planar Configuration, Pixel Representation, Rescale Slope
HEADER_TAGS = ((0x28, 0x10), (0x28, 0x11), (0x28, 0x100), (0x28, 0x101), (0x28, 0x02), (0x28, 0x08))
HEADER_TAGS += ((0x28, 0x06), (0x28, 0x103), (0x28, 0x1053), (0x7FE0, 0x10))


def bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(1, len(data))]


def insert(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[i:]


def dicom_field(rng: random.Random, data: bytes) -> bytes:
    """Overwrite the value (or the length) of one image attribute, in either byte order."""
    out = bytearray(data)
    group, element = rng.choice(HEADER_TAGS)
    for order in "<>":
        at = out.find(struct.pack(order + "HH", group, element))
        if at < 0:
            continue
        target = at + rng.choice((4, 6, 8))  # VR/length/value, explicit or implicit
        out[target : target + 4] = rng.choice(
            (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", bytes(rng.randrange(256) for _ in range(4)), b"9999")
        )
        return bytes(out[: len(data)])
    return bit_flips(rng, data)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def image_field(rng: random.Random, data: bytes) -> bytes:
    """Claim another size in the header (PNG IHDR with a valid CRC, JPEG SOF, BMP info header)."""
    w, h = rng.choice(((60000, 60000), (0, 10), (65535, 1), (1, 65535), (100000, 3), (7, 7)))
    if data.startswith(b"\x89PNG"):
        body = struct.pack(">II", w, h) + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", body) + data[33:]
    if data.startswith(b"\xff\xd8"):
        at = data.find(b"\xff\xc0")
        if at > 0:
            return data[: at + 5] + struct.pack(">HH", min(h, 65535), min(w, 65535)) + data[at + 9 :]
    if data.startswith(b"BM"):
        return data[:18] + struct.pack("<ii", w, h) + data[26:]
    return bit_flips(rng, data)


DICOM_MUTATIONS = (bit_flips, truncate, insert, dicom_field)
IMAGE_MUTATIONS = (bit_flips, truncate, insert, image_field)


def _seed_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(SEED)
    gray = (rng.random((48, 64)) * 255).astype(np.uint8)
    colour = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    colour[..., 1] = 255 - gray
    out = []
    for name, img, params in (
        ("g.png", gray, []),
        ("c.png", colour, []),
        ("c16.png", (colour.astype(np.uint16) * 257), []),
        ("c.jpg", colour, []),
        ("p.jpg", colour, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("g.jpg", gray, []),
        ("c.bmp", colour, []),
    ):
        path = folder / name
        cv2.imwrite(str(path), img, params)
        out.append(path)
    return out


def make_cases(root: Path, per_dicom: int = 20, per_image: int = 14) -> list[tuple[str, Path, str]]:
    rng = random.Random(SEED)
    cases: list[tuple[str, Path, str]] = []
    (root / "d").mkdir()
    for name in DICOM_FILES:
        data = (DATA_STORE / name).read_bytes()
        for k in range(per_dicom):
            mutate = DICOM_MUTATIONS[k % len(DICOM_MUTATIONS)]
            path = root / "d" / f"{Path(name).stem}-{k:02d}-{mutate.__name__}.dcm"
            path.write_bytes(mutate(rng, data))
            cases.append(("dicom", path, f"{name} {mutate.__name__} #{k}"))
    seeds = root / "seeds"
    seeds.mkdir()
    for source in _seed_images(seeds):
        data = source.read_bytes()
        for k in range(per_image):
            mutate = IMAGE_MUTATIONS[k % len(IMAGE_MUTATIONS)]
            folder = root / "i" / f"{source.stem}{source.suffix[1:]}-{k:02d}-{mutate.__name__}"
            folder.mkdir(parents=True)
            (folder / source.name).write_bytes(mutate(rng, data))
            cases.append(("images", folder, f"{source.name} {mutate.__name__} #{k}"))
    return cases


def _run_worker(cases: list[tuple[str, Path, str]], listing: Path) -> subprocess.Popen:
    listing.write_text("".join(f"{kind} {path}\n" for kind, path, _ in cases))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with open(listing) as stdin:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(LIMIT_AS), str(CASE_S)],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )


def _problems(cases, proc: subprocess.Popen, timeout: float) -> list[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err = "the worker ran past its overall time limit\n" + err
    problems, started, ended = [], set(), set()
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        i = int(rest.split(" ", 1)[0])
        if word == "START":
            started.add(i)
        else:
            ended.add(i)
        if word == "UNCAUGHT":
            problems.append(f"{cases[i][2]} ({cases[i][1]}): {rest.split(' ', 1)[1]}")
    for i in sorted(started - ended):
        what = "hung" if "Timeout" in err or "past its" in err else f"crashed (exit {proc.returncode})"
        problems.append(f"{cases[i][2]} ({cases[i][1]}): {what}: {err.strip()[-600:]}")
    if not problems and (proc.returncode != 0 or len(ended) != len(cases)):
        problems.append(
            f"worker exit {proc.returncode} after {len(ended)} of {len(cases)} cases: {err[-600:]}"
        )
    return problems


@pytest.mark.skipif(DATA_STORE is None, reason="pydicom-data is not installed")
def test_mutated_dicom_and_image_files_give_only_badframe(tmp_path: Path):
    cases = make_cases(tmp_path)
    assert len(cases) >= 250
    dicom = [c for c in cases if c[0] == "dicom"]
    images = [c for c in cases if c[0] == "images"]
    # two workers, one a core: the DICOM cases and the image cases side by side
    procs = [(g, _run_worker(g, tmp_path / f"cases-{i}.txt")) for i, g in enumerate((dicom, images))]
    problems = []
    for group, proc in procs:
        problems += _problems(group, proc, timeout=CASE_S * len(group) + 30)
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:20])
