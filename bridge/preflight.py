"""What the daemon needs from the machine, checked before anything starts: a store directory it
can write, a port it can listen on, an interpreter the service's user can run.

`serve` asks before it opens the store or logs in to a CRM, so a mistake ends in one line that
says which path or port, why, and as which user, instead of a traceback from deep inside the
start-up; `check` asks the same questions of the same config.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
import sys
from pathlib import Path

# A service's own view of the file system (deploy/crm-bridge.service): ProtectHome=yes hides
# these, and DynamicUser= runs it as a user that is nobody's owner.
HIDDEN_FROM_SERVICES = (Path("/root"), Path("/home"), Path("/run/user"))


class ListenError(OSError):
    """The daemon cannot listen where it was told to."""


def current_user() -> str:
    """`alice (uid 1000)`: who this process runs as."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:  # a DynamicUser= has no passwd entry outside its service
        return f"uid {uid}"


def _owner(path: Path) -> str:
    info = path.stat()
    try:
        name = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        name = f"uid {info.st_uid}"
    return f"owned by {name}, mode {stat.S_IMODE(info.st_mode):04o}"


def _why_not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
        return f"permission denied ({_owner(path)})"
    except OSError as exc:
        return exc.strerror or str(exc)


def store_problem(path: Path) -> tuple[str, bool] | None:
    """Why this process could not keep a SQLite store at `path` (the file, and its -wal, -shm
    and .lock files beside it), and whether that is certain: False when only a directory is
    missing that the service manager may make (systemd's StateDirectory=). None: it can."""
    directory = path.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != directory:
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return None  # the store makes the missing directories
        return (
            f"{directory} does not exist, and {current_user()} cannot create it in {existing}:"
            f" {_why_not_writable(existing)}",
            False,
        )
    if not directory.is_dir():
        return f"{directory} is not a directory", True
    if path.is_dir():
        return f"{path} is a directory", True
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return (
            f"{current_user()} cannot write {path}: {_why_not_writable(path)}",
            True,
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        return (
            f"{current_user()} cannot write in {directory} (the store keeps its -wal, -shm and"
            f" .lock files there): {_why_not_writable(directory)}",
            True,
        )
    return None


def interpreter_problem(executable: str = sys.executable) -> str | None:
    """Why a service user other than this file's owner (systemd's DynamicUser=, behind
    ProtectHome=yes) could not run this interpreter, or None. A venv's `python` is a link to
    the interpreter that made it: a per-user one (pyenv, under /root or /home) is out of reach
    of every other user."""
    real = Path(os.path.realpath(executable))
    for hidden in HIDDEN_FROM_SERVICES:
        if real.is_relative_to(hidden):
            return (
                f"{executable} runs {real}, under {hidden}, which ProtectHome=yes hides from the"
                " service (and other users may not enter): make the venv with the system's"
                " interpreter, e.g. /usr/bin/python3 -m venv /opt/crm-bridge/venv"
            )
    for part in (real, *real.parents):
        mode = part.stat().st_mode
        needed = stat.S_IXOTH | (stat.S_IROTH if part == real else 0)
        if mode & needed != needed:
            return (
                f"{executable} runs {real}, and other users cannot reach it ({part} is"
                f" {_owner(part)}): a service user gets Permission denied; make the venv with"
                " the system's interpreter, e.g. /usr/bin/python3 -m venv /opt/crm-bridge/venv"
            )
    return None


def _port_holder(port: int) -> str | None:
    """`pid 1234 (python3: crm-bridge serve ...)`, the process listening on `port`, when this
    process may see it (its own user's, or any as root); None otherwise."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                continue
            command = " ".join(
                (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
            )
        except OSError:
            continue
        return f"pid {proc.name} ({command[:120]})"
    return None


def _listen_error(host: str, port: int, exc: OSError) -> ListenError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        holder = _port_holder(port)
        held = f" by {holder}" if holder else " by another process (`ss -ltnp` names it)"
        message = (
            f"cannot listen on {where}: the port is already in use{held}; stop it, or give"
            " this daemon another port (--port N, or server.port in the config)"
        )
    elif exc.errno == errno.EACCES:
        message = (
            f"cannot listen on {where}: permission denied ({current_user()}; ports below 1024"
            " need root or CAP_NET_BIND_SERVICE): use a port above 1023"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        message = f"cannot listen on {where}: no network interface of this machine has {host}"
    else:
        message = f"cannot listen on {where}: {exc.strerror or exc}"
    return ListenError(exc.errno or 0, message)


def listen(host: str, port: int, backlog: int = 128) -> list[socket.socket]:
    """Listening sockets for `host` (every address it resolves to) and `port` (0: a free one,
    the same on every address), made before the daemon starts anything else."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(0, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise _listen_error(host, port, exc) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
