"""Bounded fuzz tests of the TIFF reading path (:func:`autostructn2v_jax.tiffio.read_image`).

Contract checked here: whatever bytes a ``*.tif`` file holds, ``read_image`` either

* returns a finite ``(P, H, W)`` array of a numeric dtype (plus ``meta`` naming the file), or
* raises :class:`~autostructn2v_jax.errors.UserInputError` whose message is one line and names
  the file.

Any other exception, a hang, or an attempt to allocate memory for an absurd image claimed by a
corrupted header is a failure.

Layout:

* ``test_mutated_tiffs_fail_cleanly``: ``N_MUTANTS`` mutants of a few valid seed TIFFs (written by
  tifffile), produced by a seeded ``numpy`` Generator (byte flips, random spans, truncation,
  duplicated / zeroed chunks, header bytes, first-IFD offset, IFD entry type / count / value,
  huge width / height). The reads run in two child processes (2 cores) with a per-file
  ``SIGALRM`` time bound, an address-space limit (so a runaway allocation surfaces as a
  ``MemoryError`` instead of taking the machine down) and an overall wall-clock bound. Each failure
  is reported with ``MASTER_SEED`` and the mutant index; ``_make_mutant(seed_bytes, idx)``
  regenerates it exactly.
* ``test_huge_dimension_headers_rejected_before_allocation``: hand-made IFDs claiming enormous
  images must be refused without trying to allocate the claimed size.
* ``test_random_bytes_named_tif``: hypothesis, random byte strings (optionally behind a valid TIFF
  header) saved as ``*.tif``.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autostructn2v_jax import tiffio
from autostructn2v_jax.errors import UserInputError

REPO = Path(__file__).resolve().parent.parent
MASTER_SEED = 20240611
N_MUTANTS = 300  # total over all seeds
PER_FILE_S = 5.0  # per-read time bound (SIGALRM in the child)
TOTAL_S = 50.0  # wall-clock bound for each child (they run in parallel)
N_WORKERS = 2
CHILD_ADDRESS_SPACE = 4 << 30  # RLIMIT_AS of the reader children (jax import needs ~0.6 GiB)
MAX_OK_BYTES = 256 << 20  # a successful read of a mutant of a tiny seed must stay small
_ALLOC_WORDS = ("memoryerror", "unable to allocate", "cannot allocate")


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------
def _write_seeds(folder: Path) -> dict[str, tuple[Path, bool]]:
    """Valid seed TIFFs: name -> (path, is_2d). Deterministic content."""
    rng = np.random.default_rng(MASTER_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, tuple[Path, bool]] = {}

    def put(name: str, arr: np.ndarray, is_2d: bool, **kw) -> None:
        p = folder / f"{name}.tif"
        tifffile.imwrite(p, arr, **kw)
        seeds[name] = (p, is_2d)

    put("u8_2d", rng.integers(0, 256, (40, 48), dtype=np.uint8), True)
    put("u16_zyx_imagej", rng.integers(0, 4096, (3, 32, 40), dtype=np.uint16), False,
        imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"},
        resolution=(1 / 0.5, 1 / 0.5))
    put("f32_2d", rng.standard_normal((36, 44)).astype(np.float32), True)
    put("u16_zlib", rng.integers(0, 64, (48, 40), dtype=np.uint16), True,
        compression="zlib", rowsperstrip=8)
    put("rgb_u8", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), False, photometric="rgb")
    put("u16_tiled", rng.integers(0, 65536, (48, 48), dtype=np.uint16), True, tile=(16, 16))
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, tuple[Path, bool]]:
    out = _write_seeds(tmp_path_factory.mktemp("fuzz_seeds"))
    for name, (p, _) in out.items():  # the seeds themselves must read fine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the RGB note
            planes, meta = tiffio.read_image(p)
        assert planes.ndim == 3 and np.isfinite(planes).all(), name
        assert meta["path"] == str(p)
    return out


# --------------------------------------------------------------------------------------------
# Mutations (all driven by one numpy Generator per mutant: np.random.default_rng([MASTER_SEED, i]))
# --------------------------------------------------------------------------------------------
_BOUNDARY_U32 = (0, 1, 2, 7, 8, 0x7F, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                 0xFFFFFFFE, 0xFFFFFFFF)


def _ifd_entries(buf: bytes | bytearray) -> tuple[str, list[int]]:
    """Byte order ('<' / '>') and start offsets of the 12-byte entries of the first classic IFD."""
    if len(buf) < 8 or bytes(buf[:2]) not in (b"II", b"MM"):
        return "<", []
    bo = "<" if bytes(buf[:2]) == b"II" else ">"
    off = struct.unpack(bo + "I", bytes(buf[4:8]))[0]
    if off + 2 > len(buf):
        return bo, []
    n = struct.unpack(bo + "H", bytes(buf[off:off + 2]))[0]
    starts = [off + 2 + 12 * i for i in range(n) if off + 2 + 12 * (i + 1) <= len(buf)]
    return bo, starts


def _rand_u32(rng: np.random.Generator, size: int) -> int:
    pick = rng.integers(0, 4)
    if pick == 0:
        return int(rng.choice(_BOUNDARY_U32))
    if pick == 1:
        return int(rng.integers(0, max(size, 1) * 2 + 1))
    if pick == 2:
        return int(max(size + int(rng.integers(-16, 17)), 0))
    return int(rng.integers(0, 2**32))


def _mutate_once(buf: bytearray, rng: np.random.Generator) -> tuple[bytearray, str]:
    n = len(buf)
    op = int(rng.integers(0, 11))
    if n == 0:
        return bytearray(rng.bytes(int(rng.integers(1, 64)))), "random_bytes"
    if op == 0:  # flip random bytes
        k = int(rng.integers(1, 9))
        pos = rng.integers(0, n, k)
        for p in pos:
            buf[p] ^= int(rng.integers(1, 256))
        return buf, f"flip{k}"
    if op == 1:  # overwrite a span with random bytes
        a = int(rng.integers(0, n))
        ln = int(rng.integers(1, min(64, n - a) + 1))
        buf[a:a + ln] = rng.bytes(ln)
        return buf, f"span@{a}+{ln}"
    if op == 2:  # truncate
        cut = int(rng.integers(0, n))
        return buf[:cut], f"truncate@{cut}"
    if op == 3:  # duplicate a chunk (insert elsewhere: shifts everything after it)
        a = int(rng.integers(0, n))
        ln = int(rng.integers(1, min(256, n - a) + 1))
        at = int(rng.integers(0, n + 1))
        return buf[:at] + buf[a:a + ln] + buf[at:], f"dup@{a}+{ln}->{at}"
    if op == 4:  # zero a chunk
        a = int(rng.integers(0, n))
        ln = int(rng.integers(1, min(512, n - a) + 1))
        buf[a:a + ln] = bytes(ln)
        return buf, f"zero@{a}+{ln}"
    if op == 5:  # header bytes (first 16)
        p = int(rng.integers(0, min(16, n)))
        buf[p] = int(rng.integers(0, 256))
        return buf, f"hdr@{p}"
    bo, entries = _ifd_entries(buf)
    if op == 6 or not entries:  # first-IFD offset
        if n >= 8:
            v = _rand_u32(rng, n)
            buf[4:8] = struct.pack(bo + "I", v)
            return buf, f"ifdoff={v}"
        return buf[:0], "truncate@0"
    e = int(rng.choice(entries))
    if op == 7:  # entry type
        v = int(rng.integers(0, 20))
        buf[e + 2:e + 4] = struct.pack(bo + "H", v)
        return buf, f"type@{e}={v}"
    if op == 8:  # entry count
        v = _rand_u32(rng, n)
        buf[e + 4:e + 8] = struct.pack(bo + "I", v)
        return buf, f"count@{e}={v}"
    if op == 9:  # entry value / offset
        v = _rand_u32(rng, n)
        buf[e + 8:e + 12] = struct.pack(bo + "I", v)
        return buf, f"value@{e}={v}"
    # op 10: huge / odd width or height (rewritten as a LONG)
    dims = [s for s in entries if struct.unpack(bo + "H", bytes(buf[s:s + 2]))[0] in (256, 257)]
    if not dims:
        return buf, "nodims"
    s = int(rng.choice(dims))
    v = int(rng.choice([0, 1, 65535, 65536, 100_000, 1_000_000, 0x7FFFFFFF, 0xFFFFFFFF]))
    buf[s + 2:s + 12] = struct.pack(bo + "HII", 4, 1, v)
    return buf, f"dim@{s}={v}"


def _make_mutant(seed_bytes: bytes, idx: int) -> tuple[bytes, str]:
    """Mutant ``idx`` of ``seed_bytes`` (reproducible) and a description of the mutations."""
    rng = np.random.default_rng([MASTER_SEED, idx])
    buf = bytearray(seed_bytes)
    ops = []
    for _ in range(int(rng.integers(1, 4))):
        buf, desc = _mutate_once(buf, rng)
        ops.append(desc)
    return bytes(buf), ",".join(ops)


# --------------------------------------------------------------------------------------------
# Child-process reader (time / memory bounded)
# --------------------------------------------------------------------------------------------
_CHILD = r"""
import json, resource, signal, sys, traceback, warnings
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import numpy as np
from autostructn2v_jax import tiffio
from autostructn2v_jax.errors import UserInputError

class Hang(BaseException):
    pass

def peak_rss_mb():
    # VmHWM belongs to this process's own address space; ru_maxrss on Linux starts from the
    # forking parent's RSS (a large pytest process), so it would blame the reader for it.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

def on_alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, on_alarm)
jobs = json.load(open(sys.argv[1]))
out = open(sys.argv[2], "a", buffering=1)
warnings.simplefilter("ignore")
for job in jobs:
    out.write(json.dumps({{"start": job["key"]}}) + "\n")
    rec = {{"key": job["key"]}}
    signal.setitimer(signal.ITIMER_REAL, {per_file})
    try:
        planes, meta = tiffio.read_image(job["path"], axes=job["axes"])
        signal.setitimer(signal.ITIMER_REAL, 0)
        planes = np.asarray(planes)
        numeric = bool(np.issubdtype(planes.dtype, np.integer)
                       or np.issubdtype(planes.dtype, np.floating))
        rec.update(outcome="ok", shape=list(planes.shape), dtype=str(planes.dtype),
                   nbytes=int(planes.nbytes), numeric=numeric,
                   finite=bool(np.isfinite(planes).all()) if numeric else False,
                   meta_path=str(meta.get("path")))
    except UserInputError as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        rec.update(outcome="uie", type=type(exc).__name__, msg=str(exc))
    except Hang:
        rec.update(outcome="hang")
    except BaseException as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        rec.update(outcome="other", type=type(exc).__name__, msg=str(exc)[:500],
                   tb=traceback.format_exc()[-1500:])
    rec["maxrss_mb"] = peak_rss_mb()
    out.write(json.dumps(rec) + "\n")
out.write(json.dumps({{"done": True}}) + "\n")
"""


def _run_readers(jobs: list[dict], workdir: Path) -> tuple[dict[str, dict], list[str]]:
    """Read every job in ``N_WORKERS`` bounded children. Returns (results by key, problems)."""
    code = _CHILD.format(limit=CHILD_ADDRESS_SPACE, per_file=PER_FILE_S)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("JAX_PLATFORMS", "cpu")
    procs = []
    for w in range(min(N_WORKERS, len(jobs))):
        chunk = jobs[w::min(N_WORKERS, len(jobs))]
        jf, rf = workdir / f"jobs{w}.json", workdir / f"results{w}.jsonl"
        jf.write_text(json.dumps(chunk))
        rf.write_text("")
        p = subprocess.Popen([sys.executable, "-c", code, str(jf), str(rf)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append((p, rf))
    deadline = time.monotonic() + TOTAL_S
    results: dict[str, dict] = {}
    problems: list[str] = []
    for p, rf in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            problems.append(f"reader child exceeded {TOTAL_S}s (killed)")
        started, done = None, False
        for line in rf.read_text().splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            elif "done" in rec:
                done = True
            else:
                results[rec["key"]] = rec
                started = None
        if started is not None:
            problems.append(f"{started}: reader died or hung (uninterruptible) on this file")
        if not done and started is None:
            tail = err.decode(errors="replace")[-2000:] if err else ""
            problems.append(f"reader child exited early (rc={p.returncode}): {tail}")
    return results, problems


def _check_record(rec: dict | None, path: Path, label: str) -> str | None:
    """None if ``rec`` satisfies the read contract for ``path``, else a problem description."""
    if rec is None:
        return f"{label}: no result (child died before reading it)"
    out = rec["outcome"]
    if out == "hang":
        return f"{label}: read took longer than {PER_FILE_S}s"
    if out == "other":
        return f"{label}: {rec['type']}: {rec['msg']}\n{rec.get('tb', '')}"
    if out == "uie":
        msg = rec["msg"]
        if str(path) not in msg:
            return f"{label}: UserInputError does not name the file: {msg!r}"
        if "\n" in msg or "\r" in msg:
            return f"{label}: UserInputError is not one line: {msg!r}"
        if any(w in msg.lower() for w in _ALLOC_WORDS):
            return f"{label}: reader tried a huge allocation (no size guard): {msg!r}"
        return None
    shape = rec["shape"]
    if len(shape) != 3 or min(shape) < 1:
        return f"{label}: returned shape {shape}, expected (P, H, W) with P, H, W >= 1"
    if not rec["numeric"]:
        return f"{label}: returned non-numeric dtype {rec['dtype']}"
    if not rec["finite"]:
        return f"{label}: returned NaN/Inf pixels (must be refused)"
    if rec["nbytes"] > MAX_OK_BYTES:
        return f"{label}: returned an implausibly large array {shape} {rec['dtype']}"
    if rec["meta_path"] != str(path):
        return f"{label}: meta['path'] is {rec['meta_path']!r}"
    return None


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_mutation_is_reproducible():
    seed = bytes(range(256)) * 4
    assert _make_mutant(seed, 7) == _make_mutant(seed, 7)
    assert any(_make_mutant(seed, i)[0] != seed for i in range(5))


def test_mutated_tiffs_fail_cleanly(seeds, tmp_path):
    t0 = time.monotonic()
    names = sorted(seeds)
    seed_bytes = {n: seeds[n][0].read_bytes() for n in names}
    jobs, index = [], {}
    for idx in range(N_MUTANTS):
        name = names[idx % len(names)]
        blob, desc = _make_mutant(seed_bytes[name], idx)
        path = tmp_path / f"m{idx:03d}_{name}.tif"
        path.write_bytes(blob)
        label = f"[MASTER_SEED={MASTER_SEED} idx={idx} seed={name} ops={desc}] {path.name}"
        axes_list = [None, "YX"] if seeds[name][1] else [None]
        for axes in axes_list:
            key = f"{idx}:{axes}"
            jobs.append({"key": key, "path": str(path), "axes": axes})
            index[key] = (path, f"{label} axes={axes}")

    results, problems = _run_readers(jobs, tmp_path)
    outcomes: dict[str, int] = {}
    for key, (path, label) in index.items():
        rec = results.get(key)
        if rec is not None:
            outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
        bad = _check_record(rec, path, label)
        if bad:
            problems.append(bad)
    elapsed = time.monotonic() - t0
    print(f"fuzz: {len(jobs)} reads of {N_MUTANTS} mutants in {elapsed:.1f}s; outcomes {outcomes}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])
    # the mutations must exercise both paths, otherwise the fuzzer is not doing its job
    assert outcomes.get("uie", 0) > 0 and outcomes.get("ok", 0) > 0, outcomes


def _classic_tiff(width: int, height: int, *, compression: int = 1, bps: int = 16,
                  spp: int = 1, payload: bytes = b"\0" * 16, bytecount: int | None = None,
                  tile: int | None = None, nplanes: int = 1) -> bytes:
    """A minimal little-endian classic TIFF whose IFD(s) claim ``width`` x ``height``."""
    if compression == 8:
        payload = zlib.compress(payload)
    count = len(payload) if bytecount is None else bytecount
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    ifd_offsets = []
    for _ in range(nplanes):
        data_off = len(out)
        out += payload
        if len(out) % 2:
            out += b"\0"
        entries = [(256, 4, width), (257, 4, height), (258, 3, bps), (259, 3, compression),
                   (262, 3, 1), (277, 3, spp)]
        if tile:
            entries += [(322, 4, tile), (323, 4, tile), (324, 4, data_off), (325, 4, count)]
        else:
            entries += [(273, 4, data_off), (278, 4, height), (279, 4, count)]
        entries.sort()
        ifd_offsets.append(len(out))
        out += struct.pack("<H", len(entries))
        for tag, typ, val in entries:
            out += (struct.pack("<HHIHH", tag, typ, 1, val, 0) if typ == 3
                    else struct.pack("<HHII", tag, typ, 1, val))
        out += struct.pack("<I", 0)
    out[4:8] = struct.pack("<I", ifd_offsets[0])
    for a, b in zip(ifd_offsets, ifd_offsets[1:]):  # chain the IFDs
        n = struct.unpack("<H", out[a:a + 2])[0]
        out[a + 2 + 12 * n:a + 6 + 12 * n] = struct.pack("<I", b)
    return bytes(out)


_HUGE = {
    # enormous claims (tens of GiB .. EiB) with tiny data: must be refused by a size guard
    "zlib_strip_100k": dict(width=100_000, height=100_000, compression=8),
    "zlib_strip_max": dict(width=0xFFFFFFFF, height=0xFFFFFFFF, compression=8),
    "zlib_tile_100k": dict(width=100_000, height=100_000, compression=8, tile=65536),
    "zlib_rgb_200k": dict(width=200_000, height=200_000, compression=8, bps=8, spp=3),
    "raw_strip_100k_short_count": dict(width=100_000, height=100_000, bytecount=16),
    "raw_strip_100k_true_count": dict(width=100_000, height=100_000,
                                      bytecount=(100_000 * 100_000 * 2) % 2**32),
    "zlib_f32_60k": dict(width=60_000, height=60_000, compression=8, bps=32),
    # moderate claims (GiB range, under the size limit) spread over pages: the broken strips must
    # be refused cleanly, without touching the (lazily allocated) output
    "zlib_pages_20k": dict(width=20_000, height=20_000, compression=8, bps=8, nplanes=3),
}


def test_huge_dimension_headers_rejected_before_allocation(tmp_path):
    jobs, paths = [], {}
    for case, kw in sorted(_HUGE.items()):
        path = tmp_path / f"huge_{case}.tif"
        path.write_bytes(_classic_tiff(**kw))
        jobs.append({"key": case, "path": str(path), "axes": None})
        paths[case] = path
    results, problems = _run_readers(jobs, tmp_path)
    for case, path in paths.items():
        rec = results.get(case)
        bad = _check_record(rec, path, case)
        if bad:
            problems.append(bad)
        elif rec["outcome"] != "uie":
            problems.append(f"{case}: expected UserInputError, got {rec}")
        elif rec["maxrss_mb"] > 1024:  # the claimed pixels were never materialised
            problems.append(f"{case}: reader peak RSS {rec['maxrss_mb']} MiB")
    assert not problems, "\n".join(problems)


def test_huge_dimension_guard_in_process(tmp_path):
    """The size guard fires before tifffile allocates (checked in-process, no memory limit)."""
    path = tmp_path / "huge.tif"
    path.write_bytes(_classic_tiff(100_000, 100_000, compression=8))
    with pytest.raises(UserInputError) as info:
        tiffio.read_image(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert not any(w in msg.lower() for w in _ALLOC_WORDS), msg


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so ``except Exception`` in the reader cannot eat it."""


@contextmanager
def _time_bound(seconds: float):
    def handler(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_TIFF_HEADERS = [b"II*\x00\x08\x00\x00\x00", b"MM\x00*\x00\x00\x00\x08",
                 b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00"]


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=0, max_size=600),
       header=st.sampled_from([b""] + _TIFF_HEADERS),
       suffix=st.sampled_from([".tif", ".TIFF", ".tiff"]))
def test_random_bytes_named_tif(tmp_path, body, header, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(header + body)
    try:
        with _time_bound(PER_FILE_S), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            planes, meta = tiffio.read_image(path)
    except UserInputError as exc:
        msg = str(exc)
        assert str(path) in msg, msg
        assert "\n" not in msg and "\r" not in msg, msg
        return
    except _Timeout:
        pytest.fail(f"read_image hung > {PER_FILE_S}s on {(header + body)!r}")
    # Random bytes essentially never form a readable image; if they do, it must be a sane one.
    assert header, f"random bytes without a TIFF header were read as an image: {planes.shape}"
    assert planes.ndim == 3 and min(planes.shape) >= 1 and np.isfinite(planes).all()
    assert meta["path"] == str(path)


def test_list_tiffs_with_odd_entries(tmp_path):
    """Directories / broken links named *.tif are skipped; garbage *.tif files are listed."""
    (tmp_path / "dir.tif").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "broken.tif")
    (tmp_path / "junk.TIF").write_bytes(b"not a tiff")
    (tmp_path / "notes.txt").write_text("x")
    found = tiffio.list_tiffs(tmp_path)
    assert [p.name for p in found] == ["junk.TIF"]
    with pytest.raises(UserInputError) as info:
        tiffio.read_image(found[0])
    assert str(found[0]) in str(info.value)
    with pytest.raises(UserInputError):
        tiffio.list_tiffs(tmp_path / "dir.tif")
