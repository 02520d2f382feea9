"""Build generated C sources into shared objects, cached on disk, and load them with ctypes.

* The compiler is ``$CC`` (split like a shell: ``ccache gcc`` works), else ``cc``. Its flags are probed once per machine and compiler (the result is
  cached beside the objects): ``-O3 -std=c11 -fPIC -shared -fno-math-errno -ffp-contract=off`` always
  (without ``-fno-math-errno`` gcc keeps ``sqrtf`` a library call for errno's sake and does not vectorise the
  loop: 3.5x slower, measured; without ``-ffp-contract=off`` it fuses multiply-adds and the last bits differ
  from torch's separately rounded operations), ``-march=native`` where the compiler takes it, ``-fopenmp``
  where it takes it and links (else the kernels run serially, with a warning).
* One C++ source, ``runtime/host_ptrs.cpp`` (the fast step's checks and reads through torch's C++ objects), is
  built with ``$CXX`` (else ``c++``), ``CXX_FLAGS`` and torch's headers and libc10 (``host_ptrs.torch_flags``);
  without one, the fast step reads from Python.
* An object is named by a digest of the source, the compiler's identity, the flags and the ``-D`` defines
  (the storage dtypes; for the C++ helper also torch's paths and version): ``$OPTGEN_CACHE_DIR/c/<stem>_<digest>.so``. A warm start loads it: no compiler runs.
* Concurrent processes may build the same object: each compiles to its own temporary file and renames it into
  place (``os.replace`` is atomic), so a reader sees a whole object or none.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..codegen.render import cache_dir

BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
CXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared")  # the one C++ source (runtime/host_ptrs.cpp): no element loops
_PROBE_SOURCE = """
#include <math.h>
#include <stdint.h>
void probe(float *restrict x, int64_t n) {
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; ++i) x[i] = sqrtf(x[i]);
}
"""


class CKernelsUnavailable(UserWarning):
    """Warned once per distinct failure when the C kernels cannot be built and the eager torch path runs."""


class BuildError(RuntimeError):
    """The C compiler is missing or failed; ``command`` and ``output`` say how."""

    def __init__(self, message: str, command: list[str] | None = None, output: str = ""):
        super().__init__(message)
        self.command = command
        self.output = output


@dataclass(frozen=True)
class Toolchain:
    compiler: str  # the resolved path
    prefix: tuple[str, ...]  # the compiler and the words $CC gave after it (``ccache gcc``, ``gcc -m64``)
    identity: str  # first line of `cc --version`: part of every object's key
    flags: tuple[str, ...]
    openmp: bool


def compiler_command() -> list[str]:
    """``$CC`` split as a shell would (``ccache gcc``, ``gcc -m64``), else ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


@functools.cache
def cxx_toolchain() -> Toolchain:
    """``$CXX`` (split like ``$CC``), else ``c++``, with ``CXX_FLAGS``: for ``runtime/host_ptrs.cpp``, which uses
    torch's C++ objects. Not probed: a compiler that fails says so when the source builds."""
    path, prefix, identity = _resolve(shlex.split(os.environ.get("CXX") or "c++"), "C++", "CXX")
    return Toolchain(path, prefix, identity, CXX_FLAGS, False)


def _resolve(command: list[str], language: str, variable: str) -> tuple[str, tuple[str, ...], str]:
    """The compiler of ``command`` (its words after the first kept: ``ccache gcc``): its resolved path, the
    command with that path, and its identity (the first line of ``--version``)."""
    path = shutil.which(command[0]) if command else None
    if path is None:
        raise BuildError(f"no {language} compiler: {' '.join(command) or '$' + variable!r} is not on PATH (set {variable} to one)")
    prefix = (path, *command[1:])
    version = _run([*prefix, "--version"])
    identity = (version.stdout or version.stderr).splitlines()[0].strip() if version.returncode == 0 else path
    return path, prefix, identity


def _run(command: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


@functools.cache
def toolchain(command: tuple[str, ...] | None = None) -> Toolchain:
    """The compiler and the flags it takes, probed once per machine (cached on disk) and per process."""
    path, prefix, identity = _resolve(list(command or compiler_command()), "C", "CC")
    key = hashlib.sha256(f"{prefix}\n{identity}\n{BASE_FLAGS}".encode()).hexdigest()[:16]
    record = cache_dir() / "c" / f"toolchain_{key}.json"
    try:
        saved = json.loads(record.read_text())
        return Toolchain(path, prefix, identity, tuple(saved["flags"]), bool(saved["openmp"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    flags = list(BASE_FLAGS)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text(_PROBE_SOURCE)

        def builds(extra: list[str]) -> bool:
            result = _run([*prefix, *flags, *extra, str(source), "-o", str(Path(tmp) / "probe.so")])
            return result.returncode == 0

        if not builds([]):
            raise BuildError(f"the C compiler {path} cannot build a shared object with {' '.join(flags)}")
        if builds(["-march=native"]):
            flags.append("-march=native")
        openmp = builds(["-fopenmp"])
        if openmp:
            flags.append("-fopenmp")
    chain = Toolchain(path, prefix, identity, tuple(flags), openmp)
    try:  # remembered for the next process; a cache that cannot be written only costs the probe again
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp_record = record.with_suffix(f".{os.getpid()}.tmp")
        tmp_record.write_text(json.dumps({"flags": chain.flags, "openmp": openmp, "identity": identity}))
        os.replace(tmp_record, record)
    except OSError:
        pass
    if not openmp:
        warnings.warn(f"optgen: {path} does not take -fopenmp: the C kernels run on one thread", CKernelsUnavailable, stacklevel=2)
    return chain


def build(source: Path, defines: dict[str, int | str], stem: str, rebuild: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """The shared object of ``source`` compiled with ``-D`` ``defines``: from the cache, or compiled now
    (``rebuild``: compiled again over a cached object that does not load). A ``.cpp`` source is built with
    ``cxx_toolchain()``, any other with ``toolchain()``. ``extra``: flags after the source (include and library
    paths, libraries), part of the object's key like the defines."""
    chain = cxx_toolchain() if source.suffix == ".cpp" else toolchain()
    define_flags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read {source}: {exc}") from exc
    digest = hashlib.sha256(b"\n".join([text, " ".join(chain.prefix).encode(), chain.identity.encode(),
                                        " ".join(chain.flags).encode(), " ".join(define_flags).encode(),
                                        " ".join(extra).encode()]))  # fmt: skip
    target = cache_dir() / "c" / f"{stem}_{digest.hexdigest()[:16]}.so"
    if target.is_file() and not rebuild:
        return target
    # one temporary name per process and thread: threads of one process may build the same object at once
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    command = [*chain.prefix, *chain.flags, *define_flags, str(source), "-o", str(tmp), *extra, "-lm"]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        result = _run(command)
        if result.returncode != 0:
            raise BuildError(
                f"the C compiler failed on {source.name}:\n  {' '.join(command)}\n{(result.stderr or result.stdout)[-4000:]}",
                command,
                result.stderr or result.stdout,
            )
        with open(tmp, "rb") as written:  # on disk before it is named: a crash leaves no truncated object
            os.fsync(written.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise BuildError(f"cannot build {target.name} in {target.parent}: {exc}", command) from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"the C compiler ran past {exc.timeout} s on {source.name}:\n  {' '.join(command)}", command) from exc
    finally:
        with contextlib.suppress(OSError):  # gone already, or the folder never existed
            tmp.unlink()
    return target


def load_built(source: Path, defines: dict[str, int | str], stem: str, python: bool = False, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """``build`` then ``load``; a cached object that does not load (truncated, foreign) is built again once."""
    path = build(source, defines, stem, extra=extra)
    try:
        return load(path, python)
    except OSError:
        load.cache_clear()
        path = build(source, defines, stem, rebuild=True, extra=extra)
        try:
            return load(path, python)
        except OSError as exc:
            raise BuildError(f"the object built from {source.name} does not load: {exc}") from exc


@functools.cache
def load(path: Path, python: bool = False) -> ctypes.CDLL:
    """A loaded object (once per process; the path names its content). ``python``: its functions use Python's
    C API, so calls keep the GIL (``ctypes.PyDLL``); kernels release it (``ctypes.CDLL``)."""
    return (ctypes.PyDLL if python else ctypes.CDLL)(str(path))


def vectorization(source: Path, defines: dict[str, int | str] | None = None) -> dict[int, bool]:
    """Which element loops of ``source`` the compiler vectorised: {line of the loop: vectorised?}, from gcc's
    ``-fopt-info-vec`` and ``-fopt-info-loop`` reports of a build with the backend's flags (a static check:
    nothing runs). Element loops are the lines the template marks ``/* element loop``. A loop gcc unswitched on
    a NaN test (``x != x``) does not count: it is reported vectorised, but its ordinary version was left scalar
    (the NaN-propagating max of a loop-invariant operand did that to Adafactor's passes). Other unswitched loops
    (a ``where`` on a per-step condition) count as the report says. Raises BuildError for a compiler without
    the reports."""
    chain = toolchain()
    defined = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    lines = _compiled_marked_lines(chain, source, defined)
    with tempfile.TemporaryDirectory() as tmp:
        command = [*chain.prefix, *chain.flags, *defined,
                   "-fopt-info-vec-optimized", "-fopt-info-loop-optimized", str(source), "-o", str(Path(tmp) / "report.so")]  # fmt: skip
        result = _run(command)
    if result.returncode != 0 or "-fopt-info" in result.stderr:
        raise BuildError(f"no vectorisation report from {chain.compiler}", command, result.stderr)
    found = {int(m) for m in _REPORT_LINE.findall(result.stderr)}
    unswitched = {int(m) for m, _ in _UNSWITCH_LINE.findall(result.stderr)}
    # gcc names an `omp simd` loop by its pragma's line, its `for` line or a statement of its body
    return {line: bool(found & {line - 1, line, line + 1}) and not unswitched & {line - 1, line, line + 1, line + 2} for line in lines}


def _compiled_marked_lines(chain, source: Path, defined: list[str]) -> list[int]:
    """Lines of ``source`` marked ``/* element loop`` that the preprocessor keeps with these defines (an 8-bit
    buffer's quantize loop exists only where it is 8-bit): from ``-E -C``'s line markers and kept comments."""
    result = _run([*chain.prefix, *defined, "-E", "-C", str(source)])
    if result.returncode != 0:
        raise BuildError(f"{chain.compiler} could not preprocess {source.name}", [*chain.prefix, "-E", str(source)], result.stderr)
    lines, line, own = [], 0, False
    for text in result.stdout.splitlines():
        marker = _LINE_MARKER.match(text)
        if marker:
            line, own = int(marker.group(1)), Path(marker.group(2)).name == source.name
            continue
        if own and "/* element loop" in text:
            lines.append(line)
        line += 1
    return lines


_LINE_MARKER = __import__("re").compile(r'^# (\d+) "([^"]*)"')
_REPORT_LINE = __import__("re").compile(r":(\d+):\d+: optimized: loop vectorized")
_UNSWITCH_LINE = __import__("re").compile(r":(\d+):\d+: optimized: Unswitching loop on condition: if \((\w+) != \2\)")
