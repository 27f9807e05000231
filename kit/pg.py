"""A throwaway PostgreSQL server (and PgBouncer) for run_all.sh and the tests.

    python -m kit.pg start STATE [--max-connections N] [--owner PID [--cleanup DIR]]
                                                         # prints the DATABASE_URL
    python -m kit.pg stop STATE                          # stops it, removes its folder

PG_MAX_CONNECTIONS (default 100) sets the server's max_connections; PGBOUNCER names the
pgbouncer binary (default: looked up on PATH and in /usr/sbin). STATE is a small JSON
file that records the server's folder as soon as it exists, so `stop`
can clean up after a start that was interrupted half-way. The server listens on 127.0.0.1
only, on a free port, with its socket in its own temporary folder.

PostgreSQL refuses to run as root. Run as root (as CI is), the server runs as the
unprivileged account named by PG_RUN_AS (default `postgres`); run as anyone else, it runs as
that user. Its folder goes in TMPDIR (Python's tempfile default), or in /tmp when the server's
account cannot reach TMPDIR. initdb, pg_ctl, psql and PgBouncer get a minimal environment
(PATH, HOME, USER, the locale), never the caller's: a secret in root's environment stays root's. Server binaries are looked up in PG_BINDIR, then on PATH, then in
/usr/lib/postgresql/*/bin and `pg_config --bindir`; when none are found, the `pgserver` wheel
(PostgreSQL binaries on PyPI) is the fallback, and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# PostgreSQL's own default is 100; PG_MAX_CONNECTIONS raises it for large pools
DEFAULT_MAX_CONNECTIONS = int(os.environ.get("PG_MAX_CONNECTIONS") or 100)
APP_ROLE = "app"  # the role, and the database, the kit's apps use; `kit` is the superuser


class PgError(RuntimeError):
    """Raised with a one-line, user-facing reason."""


def folder_parent() -> str:
    """Where a server's (or PgBouncer's) folder goes: TMPDIR, unless the server runs as
    another account (as root) that cannot reach it; then /tmp."""
    parent = tempfile.gettempdir()
    account = run_as()
    return parent if account is None or reachable(parent, account) else "/tmp"


def reachable(folder: str, account: pwd.struct_passwd) -> bool:
    """Can ACCOUNT enter FOLDER: does it have search (x) permission on it and every parent?"""
    path = Path(folder).resolve()
    for step in (path, *path.parents):
        mode = step.stat()
        if mode.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif mode.st_gid == account.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            return False
    return True


def server_env(home: str, account: pwd.struct_passwd | None) -> dict[str, str]:
    """The environment of initdb, pg_ctl, psql, the server and PgBouncer: what they need and
    nothing of the caller's (root's secrets, KIT_APP_PASSWORD) that another account could read
    in /proc/PID/environ."""
    user = account.pw_name if account else pwd.getpwuid(os.geteuid()).pw_name
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "USER": user,
           "LOGNAME": user}
    env.update({k: v for k, v in os.environ.items()
                if k in ("LANG", "LANGUAGE", "TZ") or k.startswith("LC_")})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bindir() -> tuple[str, str]:
    """(folder with initdb/pg_ctl, how it was found)."""
    if os.environ.get("PG_BINDIR"):
        return os.environ["PG_BINDIR"], "PG_BINDIR"
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):  # follow links to the folder with all the tools
        return os.path.dirname(os.path.realpath(on_path)), "PATH"
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if versions:
        return os.path.dirname(versions[-1]), "system"
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and os.path.exists(os.path.join(out.stdout.strip(), "pg_ctl")):
            return out.stdout.strip(), "pg_config"
    return _pgserver_bindir(), "pgserver wheel"


def _pgserver_bindir() -> str:
    """Binaries from the `pgserver` wheel, installed on demand into this Python.

    Only its files are used (found without importing it): the server is started here, as
    below, not through pgserver's own API, which as root creates a user and loosens folder
    permissions."""
    if importlib.util.find_spec("pgserver") is None:
        print("kit.pg: no PostgreSQL server binaries found; installing the pgserver wheel",
              file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pgserver==0.1.4"])
        if done.returncode != 0:
            raise PgError("no PostgreSQL server binaries found and pgserver could not be "
                          "installed: install PostgreSQL (apt-get install postgresql) or set "
                          "DATABASE_URL")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec("pgserver")
    bindir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    if not (bindir / "pg_ctl").exists():
        raise PgError(f"pgserver is installed but has no pg_ctl in {bindir}")
    return str(bindir)


def run_as() -> pwd.struct_passwd | None:
    """The account to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PG_RUN_AS", "postgres")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PgError(f"running as root, PostgreSQL needs an unprivileged account; "
                      f"'{name}' does not exist (set PG_RUN_AS or create it)") from None


@dataclass
class Server:
    """What `start` left behind, as recorded in the state file."""

    dir: str
    port: int = 0
    bindir: str = ""
    found_by: str = ""
    user: str = ""
    url: str = ""
    version: str = ""
    options: str = ""  # the postgres command-line options, kept for a restart
    password: str = ""  # the app role's, made for this run (in url too)

    def _run(self, argv: list[str], stdin: str | None = None,
             **kw) -> subprocess.CompletedProcess:
        """Run initdb, pg_ctl or psql in a process group of its own; interrupted (SIGTERM
        unwinds as SystemExit), the whole group is killed: initdb's bootstrap backend and a
        half-started postmaster too, which would otherwise write into a folder being removed."""
        account = run_as()
        if account:
            kw.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE if stdin is not None else None,
                                text=True, start_new_session=True,
                                env=server_env(self.dir, account), **kw)
        try:
            out, err = proc.communicate(stdin)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def start(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
              listen: str = "127.0.0.1") -> str:
        """initdb, start on a free port, wait until it accepts connections; returns the URL.
        listen: the address to serve (another host's, inside a network namespace of kit.net).

        Nobody else gets in: every TCP line of pg_hba.conf asks for scram-sha-256, with
        passwords made for this run (the superuser's is used once, by initdb, and never kept;
        the app's is in the URL). Only the unix socket trusts, and it lives in this folder,
        which only its owner (and root) can enter."""
        self.bindir, self.found_by = find_bindir()
        account = run_as()
        self.user = account.pw_name if account else pwd.getpwuid(os.geteuid()).pw_name
        if account:
            os.chown(self.dir, account.pw_uid, account.pw_gid)
        data = os.path.join(self.dir, "data")
        pwfile = os.path.join(self.dir, "superuser.pw")
        private_file(pwfile, secrets.token_urlsafe(24) + "\n", account)
        try:
            done = self._run([f"{self.bindir}/initdb", "-D", data, "-U", "kit",
                              "--auth-local=trust", "--auth-host=scram-sha-256",
                              f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"])
        finally:
            os.unlink(pwfile)
        if done.returncode != 0:
            raise PgError(f"initdb failed: {_tail(done.stderr or done.stdout)}")
        if listen != "127.0.0.1":
            with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
                hba.write(f"host all all {listen}/24 scram-sha-256\n")
        self.port = free_port()
        self.options = (
            f"-c listen_addresses={listen} -c port={self.port} "
            f"-c unix_socket_directories={self.dir} -c max_connections={max_connections} "
            # a throwaway server: durability off, it only slows the demonstration
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        done = self.pg_ctl("start")
        if done.returncode != 0:
            raise PgError(f"PostgreSQL did not start: {_tail(self.log_tail() or done.stderr)}")
        self.version = subprocess.run([f"{self.bindir}/postgres", "--version"],
                                      capture_output=True, text=True).stdout.strip()
        self.password = secrets.token_urlsafe(24)  # URL- and SQL-safe: [A-Za-z0-9_-]
        self._create_app_role()
        self.url = f"postgresql://{APP_ROLE}:{self.password}@{listen}:{self.port}/{APP_ROLE}"
        return self.url

    def _create_app_role(self) -> None:
        """The app connects as an ordinary role that owns its database, not as a superuser
        (a superuser may also take the connections PostgreSQL reserves for repairs)."""
        done = self._run([f"{self.bindir}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                          self.dir, "-p", str(self.port), "-U", "kit", "-d", "postgres",
                          "-f", "-"],  # on stdin: no password on a command line others see
                         stdin=f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{self.password}';\n"
                               f"CREATE DATABASE {APP_ROLE} OWNER {APP_ROLE};\n")
        if done.returncode != 0:
            raise PgError(f"could not create the app's role: {_tail(done.stderr)}")

    def log_tail(self) -> str:
        try:
            return Path(self.dir, "server.log").read_text()[-2000:]
        except OSError:
            return ""

    def pg_ctl(self, action: str, mode: str = "fast",
               wait: int = 30) -> subprocess.CompletedProcess:
        """stop / start / status the server (used by the outage scenario too). stop takes a
        shutdown MODE: fast (roll back and disconnect) or immediate (abort the backends)."""
        data = os.path.join(self.dir, "data")
        argv = [f"{self.bindir}/pg_ctl", "-D", data, "-w", "-t", str(wait)]
        if action == "stop":
            argv += ["-m", mode, "stop"]
        elif action == "start":
            argv += ["-l", os.path.join(self.dir, "server.log"), "-o", self.options, "start"]
        else:
            argv += [action]
        return self._run(argv)

    def postmaster(self) -> int | None:
        """The running postmaster's pid, from its pid file; None when none runs."""
        try:
            pid = int(Path(self.dir, "data", "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def stop(self) -> None:
        """Stop the server if it runs, then remove its folder. Its processes are continued
        first (SIGCONT: the frozen scenario, a test that failed before it thawed, a whole
        server stopped). A fast shutdown that still cannot finish is followed by an immediate
        one (PostgreSQL SIGKILLs what ignores it after 5 s), then SIGKILL for the postmaster
        and its children; the folder goes only once the postmaster is gone."""
        pid = self.postmaster() if self.bindir else None
        if pid is not None:
            family = [pid, *children(pid)]
            for member in family:  # a stopped postmaster cannot even hear pg_ctl
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGCONT)
            if self.pg_ctl("stop", "fast", wait=5).returncode != 0:
                self.pg_ctl("stop", "immediate", wait=15)
            if not gone(pid, 5):  # it removes its pid file a moment before it exits
                for member in family:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(member, signal.SIGKILL)
                gone(pid, 5)  # SIGKILL cannot be ignored, nor held by a stopped process
        deadline = time.monotonic() + 5
        while os.path.exists(self.dir) and time.monotonic() < deadline:
            shutil.rmtree(self.dir, ignore_errors=True)
            time.sleep(0.05)


def proc_stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and ')'):
    [0] the state, [1] the parent's pid, [3] the session, [11] and [12] user and system CPU
    in clock ticks. OSError when there is no such process (or no /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Is PID a live process (not a zombie that its parent has yet to reap)?"""
    try:
        return proc_stat(pid)[0] != "Z"
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
    except (OSError, IndexError):
        pass
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def children(pid: int) -> list[int]:
    """PID's child processes (a postmaster's backends), from /proc; [] where there is none."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc_stat(entry.name)[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def gone(pid: int, seconds: float) -> bool:
    """Wait up to SECONDS for PID to end; True once it has."""
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def private_file(path: str, text: str, account) -> None:
    """Write a secret readable by its owner only (the server's ACCOUNT, when given)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(text)
    if account:
        os.chown(path, account.pw_uid, account.pw_gid)


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable: PGBOUNCER (even a wrong one), PATH, then the sbin folders."""
    if os.environ.get("PGBOUNCER"):
        return shutil.which(os.environ["PGBOUNCER"])
    return shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path="/usr/sbin:/usr/local/sbin")  # Debian puts it in sbin


@dataclass
class Bouncer:
    """A throwaway PgBouncer in transaction mode in front of a server on 127.0.0.1.

    Runs as the same unprivileged account as the server (PgBouncer refuses root too). The
    app's `options` startup parameter (its statement_timeout) is one PgBouncer cannot pass
    on, so it is ignored here and the timeout is set on each server connection instead.
    """

    dir: str
    port: int = 0
    pid: int = 0
    listen: str = "127.0.0.1"

    def start(self, server_port: int, pool_size: int, statement_timeout_ms: int,
              max_client_conn: int = 1000, server_host: str = "127.0.0.1",
              password: str = "") -> str:
        """Start it on a free port of `listen`, in front of server_host:server_port. Clients
        log in with the app's PASSWORD (scram-sha-256), which PgBouncer also uses upstream."""
        if not password:
            raise PgError("PgBouncer needs the app role's password")
        binary = pgbouncer_binary()
        if not binary:
            raise PgError("pgbouncer is not installed (Debian/Ubuntu: apt-get install "
                          "pgbouncer; macOS: brew install pgbouncer)")
        account = run_as()
        if account:
            os.chown(self.dir, account.pw_uid, account.pw_gid)
        self.port = free_port()
        private_file(os.path.join(self.dir, "users.txt"), f'"{APP_ROLE}" "{password}"\n',
                     account)
        Path(self.dir, "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server_host} port={server_port} connect_query='SET statement_timeout = {statement_timeout_ms}'

[pgbouncer]
listen_addr = {self.listen}
listen_port = {self.port}
unix_socket_dir = {self.dir}
auth_type = scram-sha-256
auth_file = {self.dir}/users.txt
pool_mode = transaction
; server connections per database/user pair: the queue moves here from the app's pools
default_pool_size = {pool_size}
max_client_conn = {max_client_conn}
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
""")
        argv = [binary, "-d", f"{self.dir}/pgbouncer.ini"]
        kw = {}
        if account:
            kw = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        done = subprocess.run(argv, capture_output=True, text=True,
                              env=server_env(self.dir, account), **kw)
        if done.returncode != 0:
            raise PgError(f"pgbouncer did not start: {_tail(done.stderr or self.log_tail())}")
        deadline = time.monotonic() + 10
        while not self._accepts():
            if time.monotonic() > deadline:
                raise PgError(f"pgbouncer not listening after 10 s: {_tail(self.log_tail())}")
            time.sleep(0.05)
        self.pid = int(Path(self.dir, "pgbouncer.pid").read_text())
        return f"postgresql://{APP_ROLE}:{password}@{self.listen}:{self.port}/{APP_ROLE}"

    def _accepts(self) -> bool:
        """Listening, and its pid file written (it can exist empty for a moment)."""
        try:
            socket.create_connection((self.listen, self.port), timeout=0.5).close()
            return Path(self.dir, "pgbouncer.pid").read_text().strip().isdigit()
        except OSError:
            return False

    def log_tail(self) -> str:
        try:
            return Path(self.dir, "pgbouncer.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop it (SIGTERM: immediate shutdown) and remove its folder."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def bouncer(server_port: int, pool_size: int, statement_timeout_ms: int,
            max_client_conn: int = 1000, password: str = ""):
    """A PgBouncer for the block; yields (url, Bouncer)."""
    handle = Bouncer(dir=tempfile.mkdtemp(prefix="kit-pgbouncer-", dir=folder_parent()))
    try:
        yield handle.start(server_port, pool_size, statement_timeout_ms,
                           max_client_conn, password=password), handle
    finally:
        handle.stop()


def _tail(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "(no output)"


def start(state: str, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          listen: str = "127.0.0.1", owner: int | None = None,
          cleanup: str | None = None) -> Server:
    """Create a folder, record it in STATE at once, then start a server in it. A watchdog
    stops it (and removes CLEANUP) when the process OWNER ends, however it ends: a killed
    run_all.sh or test run leaves no server behind."""
    if owner:
        watchdog(state, owner, cleanup)
    server = Server(dir=tempfile.mkdtemp(prefix="kit-pg-", dir=folder_parent()))
    os.chmod(server.dir, 0o700)
    _save(state, server)
    server.start(max_connections, listen)
    _save(state, server)
    return server


def load(state: str) -> Server:
    return Server(**json.loads(Path(state).read_text()))


def command_lines() -> list[tuple[int, list[bytes]]]:
    """Every process but this one, with its command line's arguments, from /proc: to find a
    process by what it is, never by a pid a state file recorded (which a reboot may have
    given to another). One that ends while it is read is left out."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if int(cmdline.parent.name) != os.getpid():
                found.append((int(cmdline.parent.name), args))
    return found


def watchers(state: str) -> list[int]:
    """The watchdogs (`kit.pg watch STATE`) of STATE other than this process, found by their
    command line (STATE made absolute, as watchdog() passes it), never by a recorded pid."""
    wanted = os.fsencode(os.path.abspath(state))
    return [pid for pid, args in command_lines()
            if b"kit.pg" in args and b"watch" in args and wanted in args]


def stop(state: str) -> None:
    """Stop what STATE records, then, once that is done and STATE gone, its watchdog (the
    owner's own cleanup: nothing of the run outlives it). A stop that fails or is interrupted
    leaves the watchdog to finish it when the owner ends. Quiet when there is nothing (left)
    to stop."""
    _stop(state)
    if not os.path.exists(state):
        for pid in watchers(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            gone(pid, 2)


def _stop(state: str) -> None:
    try:
        text = Path(state).read_text()
    except OSError:
        return
    if not text:  # made (database() makes it), never written: a start that failed first
        Path(state).unlink(missing_ok=True)
        return
    try:
        recorded = json.loads(text)
    except ValueError:
        return
    if "bouncer" in recorded:
        Bouncer(**recorded["bouncer"]).stop()
        Path(state).unlink(missing_ok=True)
        return
    server = Server(**recorded)
    if not server.bindir:  # interrupted before binaries were chosen
        try:
            server.bindir = find_bindir()[0]
        except PgError:
            pass
    server.stop()
    Path(state).unlink(missing_ok=True)


@contextlib.contextmanager
def database(max_connections: int = DEFAULT_MAX_CONNECTIONS, own: bool = False):
    """DATABASE_URL if set (and not `own`), else a throwaway server for the block.

    Yields (url, server), server being None for DATABASE_URL."""
    if os.environ.get("DATABASE_URL") and not own:
        yield os.environ["DATABASE_URL"], None
        return
    handle, state = tempfile.mkstemp(prefix="kit-pg-state-", suffix=".json")
    os.close(handle)
    try:
        server = start(state, max_connections, owner=os.getpid())
        print(f"kit.pg: {server.version} ({server.found_by}) on 127.0.0.1:{server.port}",
              file=sys.stderr)
        yield server.url, server
    finally:
        stop(state)


def watchdog(state: str, owner: int, cleanup: str | None = None) -> None:
    """Start `python -m kit.pg watch`, detached: it waits for OWNER to end, then stops what
    STATE records. When the owner stops the server itself, the watchdog finds nothing."""
    argv = [sys.executable, "-m", "kit.pg", "watch", os.path.abspath(state), "--owner",
            str(owner)]
    argv += ["--cleanup", os.path.abspath(cleanup)] if cleanup else []
    root = str(Path(__file__).resolve().parent.parent)
    child = os.fork()  # twice, so the watchdog belongs to init: nothing of ours to reap
    if child == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.chdir(root)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.execv(sys.executable, argv)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def watch(state: str, owner: int, cleanup: str | None) -> None:
    """Wait for OWNER to end (a pidfd on Linux, else polling), then stop STATE's server."""
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:
        pidfd = None
    except (AttributeError, OSError):  # not Linux 5.3+: poll
        pidfd = -1
    if pidfd is not None and pidfd >= 0:
        select.select([pidfd], [], [])
    elif pidfd == -1:
        while True:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
    stop(state)
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)


def _save(state: str, server: Server) -> None:
    Path(state).write_text(json.dumps(asdict(server)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "pg_ctl", "bouncer", "watch"])
    parser.add_argument("state", help="state file (JSON) that records the server")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--listen", default="127.0.0.1", help="with start, bouncer: the address")
    parser.add_argument("--server", metavar="HOST:PORT", help="with bouncer: PostgreSQL")
    parser.add_argument("--pool", type=int, default=20, help="with bouncer: default_pool_size")
    parser.add_argument("--pg-ctl", default="status", help="with pg_ctl: stop|start|status")
    parser.add_argument("--owner", type=int, help="with start, watch: stop the server when "
                        "this process ends")
    parser.add_argument("--cleanup", help="with start, watch: also remove this folder then")
    args = parser.parse_args(argv)
    # SIGTERM (run_all.sh's cleanup) unwinds, so subprocess.run kills a half-done initdb
    # or pg_ctl instead of leaving it to write into a folder `stop` is removing
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.action == "start":
            server = start(args.state, args.max_connections, args.listen, args.owner,
                           args.cleanup)
            print(f"kit.pg: {server.version} ({server.found_by}: {server.bindir}) as "
                  f"{server.user}, 127.0.0.1:{server.port}, folder {server.dir}",
                  file=sys.stderr)
            print(server.url)
        elif args.action == "bouncer":  # a PgBouncer, recorded in STATE for `stop`
            handle = Bouncer(dir=tempfile.mkdtemp(prefix="kit-pgbouncer-", dir=folder_parent()),
                             listen=args.listen)
            Path(args.state).write_text(json.dumps({"bouncer": asdict(handle)}))
            host, _, port = args.server.rpartition(":")
            url = handle.start(int(port), args.pool, 15_000, 1000, server_host=host,
                               password=os.environ.get("KIT_APP_PASSWORD", ""))
            Path(args.state).write_text(json.dumps({"bouncer": asdict(handle)}))
            print(url)
        elif args.action == "stop":
            stop(args.state)
        elif args.action == "watch":
            watch(args.state, args.owner, args.cleanup)
        else:
            done = load(args.state).pg_ctl(args.pg_ctl)
            if done.returncode != 0:
                raise PgError(f"pg_ctl {args.pg_ctl}: {_tail(done.stderr or done.stdout)}")
    except PgError as exc:
        print(f"kit.pg: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
