"""Install the NSQ 1.3.0 binaries the project runs into the interpreter's scripts folder.

``install_nsq()`` is idempotent: tools already present at the right version are
left alone; the missing ones are copied from ``PATH``, built with Go from the
pinned module in ``gomod/nsq`` (beside this file), or taken from NSQ's release archive, in that
order. Example::

    from pipeline.ops.install import install_nsq, nsq_binary

    install_nsq()                 # prints what it does
    argv = [nsq_binary("nsqd"), "--version"]
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import InstallError

NSQ_VERSION = "1.3.0"
NSQ_TOOLS = ("nsqd", "nsqlookupd", "nsqadmin", "nsq_tail", "nsq_stat", "nsq_to_nsq")

#: The Go module (go.mod, go.sum) that pins NSQ and repeats its replace directive; package data, so an
#: installed wheel builds from it too.
TOOLS_MODULE = Path(__file__).resolve().parent / "gomod" / "nsq"
#: Where the official Go installer puts ``go``; it is often not on a service's PATH.
GO_FALLBACKS = (Path("/usr/local/go/bin/go"),)
#: The Go release NSQ 1.3.0's official archives were built with (part of their names).
RELEASE_GO = "go1.21.5"
RELEASE_URL = "https://github.com/nsqio/nsq/releases/download/v{version}/{archive}"
DOWNLOAD_TIMEOUT = 15.0
BUILD_TIMEOUT = 900.0
#: Environment variable that overrides :func:`bin_dir`.
BIN_ENV = "NSQ_PIPELINE_BIN"

_VERSION_RE = re.compile(r"^(\S+) v(\d+\.\d+\.\d+\S*)")
_RELEASE_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_RELEASE_TARGETS = {"linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64", "freebsd/amd64"}

Log = Callable[[str], None]


def bin_dir() -> Path:
    """Return the folder NSQ binaries are installed into and run from.

    That is the running interpreter's scripts folder (the venv's ``bin``), so
    the binaries travel with the environment, unless ``NSQ_PIPELINE_BIN`` is set.
    """
    override = os.environ.get(BIN_ENV)
    return Path(override) if override else Path(sysconfig.get_path("scripts"))


def installed_version(path: str | os.PathLike[str]) -> str | None:
    """Return the version ``<path> --version`` reports (``"1.3.0"``), or None if it cannot say."""
    probe = _probe(path)
    return probe[1] if probe else None


def nsq_binary(name: str) -> str:
    """Return the absolute path of the installed NSQ tool ``name``.

    Raises:
        InstallError: if ``bin_dir()`` holds no executable of that name.
    """
    folder = bin_dir()
    path = folder / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise InstallError(f"{name} not found in {folder}; run `pipeline install-nsq` (or `make setup`)")
    return str(path.absolute())


def install_nsq(dest: Path | None = None, *, log: Log = print) -> Path:
    """Make sure ``dest`` (default :func:`bin_dir`) holds every tool in ``NSQ_TOOLS`` at ``NSQ_VERSION``.

    Missing or wrong-version tools are copied from ``PATH``, else built with Go
    from ``gomod/nsq``, else extracted from NSQ's release archive. ``log``
    receives one short line per step. Returns ``dest``.

    Raises:
        InstallError: with one line naming what to install, if no source works
            or an installed binary does not report the expected version.
    """
    dest = Path(dest) if dest is not None else bin_dir()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InstallError(f"cannot install NSQ {NSQ_VERSION} into {dest}: {e.strerror}") from e
    current = _current_tools(dest, NSQ_TOOLS)
    for tool in NSQ_TOOLS:
        if current[tool]:
            log(f"{tool} {NSQ_VERSION} already installed")
    missing = [tool for tool in NSQ_TOOLS if not current[tool]]
    if not missing:
        return dest
    if not os.access(dest, os.W_OK):
        raise InstallError(
            f"cannot install NSQ {NSQ_VERSION} into {dest}: the folder is not writable"
            f" (choose another with {BIN_ENV} or `--dest`)"
        )
    missing = _copy_from_path(missing, dest, log)
    reasons: list[str] = []
    if missing:
        reasons.append(f"no {', '.join(missing)} {NSQ_VERSION} on PATH")
        missing = _build_with_go(missing, dest, log, reasons)
    if missing:
        missing = _download_release(missing, dest, log, reasons)
    if missing:
        raise InstallError(f"cannot install NSQ {NSQ_VERSION} into {dest}: {_and_join(reasons)}")
    _verify(dest)
    return dest


def _probe(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """Return ``(program, version)`` from ``<path> --version``, or None."""
    try:
        done = subprocess.run(
            [os.fspath(path), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.match(done.stdout.strip() or done.stderr.strip())
    if done.returncode != 0 or not match:
        return None
    return match.group(1), match.group(2)


def _is_current(path: Path, tool: str) -> bool:
    """Tell whether ``path`` is ``tool`` at ``NSQ_VERSION`` (the name guards against a mix-up of files)."""
    return path.is_file() and _probe(path) == (tool, NSQ_VERSION)


def _current_tools(dest: Path, tools: Sequence[str]) -> dict[str, bool]:
    """Check every tool in ``dest`` at once; each check starts a process, so run them in parallel."""
    with ThreadPoolExecutor(max_workers=len(tools)) as pool:
        results = pool.map(lambda tool: _is_current(dest / tool, tool), tools)
        return dict(zip(tools, results, strict=True))


def _verify(dest: Path) -> None:
    """Raise InstallError unless every tool in ``dest`` now reports ``NSQ_VERSION``."""
    current = _current_tools(dest, NSQ_TOOLS)
    wrong = [tool for tool in NSQ_TOOLS if not current[tool]]
    if wrong:
        raise InstallError(
            f"installed {', '.join(wrong)} into {dest} but they do not report version {NSQ_VERSION}"
        )


def _place(source: Path, target: Path) -> None:
    """Copy ``source`` next to ``target`` and rename it into place, so ``target`` is never half-written."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_from_path(tools: Iterable[str], dest: Path, log: Log) -> list[str]:
    """Copy each tool found on PATH (outside ``dest``) at ``NSQ_VERSION``; return the tools still missing."""
    dest_real = os.path.realpath(dest)
    search = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.realpath(d) != dest_real
    )
    missing = []
    for tool in tools:
        found = shutil.which(tool, path=search)
        if found and _is_current(Path(found), tool):
            _place(Path(found), dest / tool)
            log(f"copied {tool} {NSQ_VERSION} from {found}")
        else:
            missing.append(tool)
    return missing


def _find_go() -> str | None:
    """Return the ``go`` command to use: the one on PATH, else a standard install location."""
    found = shutil.which("go")
    if found:
        return found
    for candidate in GO_FALLBACKS:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _go_env() -> dict[str, str]:
    """Return the environment for ``go build``.

    ``-mod=mod`` lets Go fill a go.sum gap instead of failing; ``-buildvcs=false``
    because the module sits inside our git checkout, whose state is irrelevant
    to NSQ and may not be readable (e.g. git's "dubious ownership").
    """
    env = dict(os.environ)
    env["GOFLAGS"] = " ".join(filter(None, [env.get("GOFLAGS", ""), "-mod=mod", "-buildvcs=false"]))
    return env


def _build_with_go(tools: list[str], dest: Path, log: Log, reasons: list[str]) -> list[str]:
    """Build ``tools`` from ``TOOLS_MODULE`` into ``dest``; return the tools still missing."""
    go = _find_go()
    if go is None:
        reasons.append("no Go toolchain (install Go >= 1.24 from https://go.dev/dl/)")
        return tools
    where = f"{TOOLS_MODULE.parent.name}/{TOOLS_MODULE.name}"
    log(f"building {', '.join(tools)} from the Go module proxy ({where}); a minute or so the first time")
    packages = [f"github.com/nsqio/nsq/apps/{tool}" for tool in tools]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".nsq-build-") as tmp:
        try:
            done = subprocess.run(
                [go, "build", "-o", tmp + os.sep, *packages],
                cwd=TOOLS_MODULE, env=_go_env(), capture_output=True, text=True,
                timeout=BUILD_TIMEOUT, check=False,
            )
        except (OSError, subprocess.SubprocessError) as e:
            reasons.append(f"`go build` in {TOOLS_MODULE} could not run: {e}")
            return tools
        if done.returncode != 0:
            reasons.append(f"`go build` in {TOOLS_MODULE} failed: {_last_line(done.stderr)}")
            return tools
        for tool in tools:
            os.chmod(Path(tmp, tool), 0o755)
            os.replace(Path(tmp, tool), dest / tool)
    log(f"built {', '.join(tools)} {NSQ_VERSION} into {dest}")
    return []


def release_archive() -> str | None:
    """Return the name of NSQ's official archive for this OS and CPU, or None if there is none."""
    system = platform.system().lower()
    arch = _RELEASE_ARCH.get(platform.machine().lower())
    if f"{system}/{arch}" not in _RELEASE_TARGETS:
        return None
    return f"nsq-{NSQ_VERSION}.{system}-{arch}.{RELEASE_GO}.tar.gz"


def _download_release(tools: list[str], dest: Path, log: Log, reasons: list[str]) -> list[str]:
    """Extract ``tools`` from NSQ's release archive into ``dest``; return the tools still missing."""
    archive = release_archive()
    if archive is None:
        reasons.append(f"NSQ publishes no release for {platform.system()}/{platform.machine()}")
        return tools
    url = RELEASE_URL.format(version=NSQ_VERSION, archive=archive)
    log(f"downloading {url}")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".nsq-download-") as tmp:
        local = Path(tmp, archive)
        try:
            _fetch(url, local)
            _extract_tools(local, tools, Path(tmp))
        except (OSError, tarfile.TarError, KeyError) as e:
            reasons.append(f"the release download failed: {_one_line(e)} ({url})")
            return tools
        for tool in tools:
            os.replace(Path(tmp, tool), dest / tool)
    log(f"installed {', '.join(tools)} {NSQ_VERSION} from {archive}")
    return []


def _fetch(url: str, target: Path) -> None:
    """Download ``url`` to ``target``, giving up after ``DOWNLOAD_TIMEOUT`` seconds of silence."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)


def _extract_tools(archive: Path, tools: Iterable[str], into: Path) -> None:
    """Write ``<top>/bin/<tool>`` of ``archive`` to ``into/<tool>``, reading no other member.

    Members are read by exact name rather than with ``extractall`` so a hostile
    archive cannot write outside ``into``.
    """
    top = archive.name.removesuffix(".tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        for tool in tools:
            source = tar.extractfile(f"{top}/bin/{tool}")
            if source is None:
                raise KeyError(f"{top}/bin/{tool} is not a regular file in {archive.name}")
            with source, open(into / tool, "wb") as out:
                shutil.copyfileobj(source, out)
            os.chmod(into / tool, 0o755)


def _and_join(parts: Sequence[str]) -> str:
    """Join ``parts`` as an English list: ``a, b, and c``."""
    if len(parts) < 3:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + ", and " + parts[-1]


def _last_line(text: str) -> str:
    """Return the last non-empty line of ``text`` (the error, for Go's output)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _one_line(error: BaseException) -> str:
    """Return ``error`` as one line, unwrapping urllib's ``<urlopen error ...>``."""
    reason = getattr(error, "reason", None) or error
    return " ".join(str(reason).split()) or type(error).__name__
