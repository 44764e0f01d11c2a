"""Compile a C source of this package into a shared library, once per source, compiler and CPU.

The library is cached under `<cache_dir>/kernels/` by a hash of everything that shapes the
binary (source text, compiler version, flags, CPU model and features), since it is built with
-march=native for the machine that runs it. Concurrent workers may build at once: each writes a
private temporary file and renames it into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-Wall")


class KernelBuildError(RuntimeError):
    """No C compiler, or the source did not compile."""


def compiler() -> str | None:
    """The C compiler to use: $CC, else cc/gcc/clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """CPU model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))  # first core's lines; every core repeats them


def build_library(source_name: str, cache_dir: Path) -> Path:
    """Path of the compiled library for `source_name` (a .c file beside this module)."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC or install gcc)")
    source = (SOURCE_DIR / source_name).read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join(
        [source, version.encode(), " ".join(CFLAGS).encode(), _cpu_identity().encode()]
    )).hexdigest()[:16]
    out_dir = Path(cache_dir).expanduser() / "kernels"
    target = out_dir / f"{Path(source_name).stem}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, *CFLAGS, str(SOURCE_DIR / source_name), "-o", tmp, "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, target)
    log.info("built %s", target)
    return target


def load_library(source_name: str, cache_dir: Path) -> ctypes.CDLL:
    """Build if needed and load. torch must be imported first: the library's OpenMP calls then
    bind to the libgomp torch already loaded (same soname), so both share one thread pool."""
    import torch  # noqa: F401  (load order, see above)

    return ctypes.CDLL(str(build_library(source_name, cache_dir)))
