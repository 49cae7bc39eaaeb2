"""Install Toxiproxy (server and CLI) at a pinned version into the interpreter's scripts folder.

The chaos harness puts Toxiproxy between workers and nsqd to inject network
faults. Like NSQ (see :mod:`pipeline.ops.install`), it is built by the project
from the Go module proxy, never vendored: Toxiproxy's go.mod has no replace
directive, so ``go install pkg@version`` with ``GOBIN`` pointing at a
temporary folder works. The version is stamped into the binaries with
``-ldflags -X`` (a module build would otherwise report ``git``), which is how
an installed binary is recognised later. Example::

    from pipeline.ops.install_toxiproxy import install_toxiproxy, toxiproxy_binary

    install_toxiproxy()
    argv = [toxiproxy_binary("toxiproxy-server"), "-host", "127.0.0.1", "-port", "8474"]
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from pipeline.errors import InstallError
from pipeline.ops.install import BUILD_TIMEOUT, Log, _find_go, _go_env, _last_line, bin_dir

TOXIPROXY_VERSION = "2.12.0"
TOXIPROXY_MODULE = "github.com/Shopify/toxiproxy/v2"
#: installed name -> package path under the module
TOXIPROXY_TOOLS = {"toxiproxy-server": "cmd/server", "toxiproxy-cli": "cmd/cli"}

_VERSION_RE = re.compile(r"^(toxiproxy-\w+) version (\S+)")


def toxiproxy_version(path: str | os.PathLike[str]) -> str | None:
    """Return the version ``<path> -version`` reports (``"2.12.0"``), or None if it cannot say."""
    try:
        done = subprocess.run([os.fspath(path), "-version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.match(done.stdout.strip() or done.stderr.strip())
    return match.group(2) if done.returncode == 0 and match else None


def toxiproxy_binary(name: str = "toxiproxy-server") -> str:
    """Return the absolute path of the installed Toxiproxy tool ``name``.

    Raises:
        InstallError: if ``bin_dir()`` holds no executable of that name.
    """
    path = bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise InstallError(f"{name} not found in {bin_dir()}; run `pipeline install-toxiproxy` (or `make setup`)")
    return str(path.absolute())


def install_toxiproxy(dest: Path | None = None, *, log: Log = print) -> Path:
    """Make sure ``dest`` (default :func:`bin_dir`) holds ``toxiproxy-server`` and ``toxiproxy-cli`` at the pin.

    Idempotent: tools that already report ``TOXIPROXY_VERSION`` are left alone.

    Raises:
        InstallError: one line saying why, when Go is missing or the build fails.
    """
    dest = Path(dest) if dest is not None else bin_dir()
    dest.mkdir(parents=True, exist_ok=True)
    missing = [name for name in TOXIPROXY_TOOLS if toxiproxy_version(dest / name) != TOXIPROXY_VERSION]
    for name in TOXIPROXY_TOOLS:
        if name not in missing:
            log(f"{name} {TOXIPROXY_VERSION} already installed")
    if missing:
        _build(missing, dest, log)
    return dest


def _build(names: list[str], dest: Path, log: Log) -> None:
    go = _find_go()
    if go is None:
        raise InstallError(f"cannot install Toxiproxy {TOXIPROXY_VERSION}: no Go toolchain "
                           "(install Go >= 1.23 from https://go.dev/dl/)")
    log(f"building {', '.join(names)} {TOXIPROXY_VERSION} from the Go module proxy; a minute or so the first time")
    ldflags = f"-ldflags=-X {TOXIPROXY_MODULE}.Version={TOXIPROXY_VERSION}"
    with tempfile.TemporaryDirectory(dir=dest, prefix=".toxiproxy-build-") as tmp:
        for name in names:
            package = f"{TOXIPROXY_MODULE}/{TOXIPROXY_TOOLS[name]}@v{TOXIPROXY_VERSION}"
            env = {**_go_env(), "GOBIN": tmp}
            env["GOFLAGS"] = env["GOFLAGS"].replace("-mod=mod", "").strip()  # not allowed with pkg@version
            try:
                done = subprocess.run([go, "install", ldflags, package], cwd=tmp, env=env, capture_output=True,
                                      text=True, timeout=BUILD_TIMEOUT, check=False)
            except (OSError, subprocess.SubprocessError) as e:
                raise InstallError(f"`go install {package}` could not run: {e}") from e
            if done.returncode != 0:
                raise InstallError(f"`go install {package}` failed: {_last_line(done.stderr)}")
            built = Path(tmp, Path(TOXIPROXY_TOOLS[name]).name)
            os.chmod(built, 0o755)
            os.replace(built, dest / name)
            if toxiproxy_version(dest / name) != TOXIPROXY_VERSION:
                raise InstallError(f"built {name} into {dest} but it does not report version {TOXIPROXY_VERSION}")
    log(f"built {', '.join(names)} {TOXIPROXY_VERSION} into {dest}")
