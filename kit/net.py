"""Hosts on one machine: network namespaces for the client, the apps, a latency relay and the DB.

    with hosts(rtt_ms=5) as net:       # root only (CAP_NET_ADMIN)
        net.run("app", ["gunicorn", ...]); net.database_url; net.turns()

    client 10.213.11.1 ── app 10.213.11.2 / 10.213.21.1 ── relay 10.213.21.2 / 10.213.3.1 ── db 10.213.3.2

hosts(rtt, apps=3) adds app2 and app3 (10.213.12.x/22.x, 13.x/23.x), each with its own link to
the client and to the relay; pooler=True puts a host `pgb` between the relay and the database
(10.213.3.2 / 10.213.4.1, db at 10.213.4.2) for a PgBouncer of its own. Each host is a
namespace with its own network stack, joined by veth pairs, with no route past its neighbours:
an app reaches PostgreSQL only through the relay (kit.relay), which adds the round-trip time.
No address here exists outside these namespaces. Everything is removed on the way out: the
processes inside, then the namespaces, which take their links with them. A run killed before it
could do so (kill -9, a lost shell) leaves them behind; the next hosts() removes those first,
every name carrying its maker's pid (PIDxN) so that a live run's hosts are never touched.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from kit import pg

ROOT = Path(__file__).resolve().parent.parent
APPS = ["app", "app2", "app3"]
_made = itertools.count(1)  # hosts made by this process: names unique per run, in any process
_in_use: set[str] = set()  # the tags of this process's hosts, up until their down()
DB_PORT = 5432


def links(apps: int, pooler: bool) -> list[tuple[str, str, str, str]]:
    """(left host, its address, right host, its address) for each veth pair."""
    found = []
    for i, app in enumerate(APPS[:apps], 1):
        found += [("client", f"10.213.1{i}.1", app, f"10.213.1{i}.2"),
                  (app, f"10.213.2{i}.1", "relay", f"10.213.2{i}.2")]
    found.append(("relay", "10.213.3.1", "pgb" if pooler else "db", "10.213.3.2"))
    if pooler:
        found.append(("pgb", "10.213.4.1", "db", "10.213.4.2"))
    return found


class NetError(RuntimeError):
    """One line: why the hosts could not be made."""


def why_not() -> str | None:
    """Why this process cannot make hosts, or None when it can."""
    if os.geteuid() != 0:
        return "--rtt makes network namespaces, which needs root (CAP_NET_ADMIN)"
    if not shutil.which("ip"):
        return "--rtt needs iproute2's `ip` (apt-get install iproute2)"
    return None


def port_of(url: str) -> int:
    """The port of a postgresql://user@host:PORT/db URL."""
    return int(url.strip().rsplit(":", 1)[1].split("/")[0])


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NetError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    rtt_ms: float
    apps: int = 1
    pooler: bool = False
    pooler_pool: int = 20  # default_pool_size of every PgBouncer these hosts run
    tag: str = field(default_factory=lambda: f"{os.getpid()}x{next(_made)}")  # maker's pid
    dir: str = ""  # /tmp/kit-net-TAG-*: the state of PostgreSQL and any PgBouncer
    database_url: str = ""
    db_port: int = 0
    password: str = ""  # the app role's, made by kit.pg for this run
    relay: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.dir = self.dir or tempfile.mkdtemp(prefix=f"kit-net-{self.tag}-", dir="/tmp")
        _in_use.add(self.tag)

    def ns(self, role: str) -> str:
        return f"kit-{role}-{self.tag}"

    @property
    def links(self) -> list[tuple[str, str, str, str]]:
        return links(self.apps, self.pooler)

    @property
    def roles(self) -> list[str]:
        return list(dict.fromkeys(h for left, _, right, _ in self.links for h in (left, right)))

    def address(self, role: str, toward: str | None = None) -> str:
        """ROLE's address on its link toward TOWARD (default: the link it is reached by)."""
        for left, left_ip, right, right_ip in self.links:
            if right == role and (toward in (None, left)):
                return right_ip
            if left == role and toward == right:
                return left_ip
        raise KeyError(role)

    def database_url_for(self, app: str) -> str:
        """What APP connects to: the relay, on their link."""
        return f"postgresql://app:{self.password}@{self.address('relay', app)}:{DB_PORT}/app"

    def exec(self, role: str) -> list[str]:
        """The prefix that runs a command on ROLE's host."""
        return ["ip", "netns", "exec", self.ns(role)]

    def run(self, role: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.exec(role), *argv], **kw)

    def call(self, role: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.exec(role), *argv], **kw)

    def up(self, max_connections: int = 100) -> None:
        for role in self.roles:
            ip("netns", "add", self.ns(role))
            ip("-n", self.ns(role), "link", "set", "lo", "up")
        for n, (left, left_ip, right, right_ip) in enumerate(self.links):
            a, b = f"k{n}a{self.tag}", f"k{n}b{self.tag}"
            ip("link", "add", a, "type", "veth", "peer", "name", b)
            for dev, role, address in ((a, left, left_ip), (b, right, right_ip)):
                ip("link", "set", dev, "netns", self.ns(role))
                ip("-n", self.ns(role), "addr", "add", f"{address}/24", "dev", dev)
                ip("-n", self.ns(role), "link", "set", dev, "up")
        started = self.call("db", [sys.executable, "-m", "kit.pg", "start", self.state,
                                   "--listen", self.address("db"), "--max-connections",
                                   str(max_connections)], capture_output=True, text=True,
                            cwd=ROOT)
        if started.returncode:
            raise NetError(f"PostgreSQL on the db host: {started.stderr.strip()[-300:]}")
        self.db_port = port_of(started.stdout)
        self.password = urlsplit(started.stdout.strip()).password or ""
        target = f"{self.address('db')}:{self.db_port}"
        if self.pooler:  # the relay leads to PgBouncer, on a host of its own
            target = f"{self.address('pgb')}:{self.bouncer('pgb', self.address('pgb'), target)}"
        self.relay = self.run("relay", [sys.executable, "-m", "kit.relay", "--listen",
                                        f"0.0.0.0:{DB_PORT}", "--to", target,
                                        "--rtt-ms", str(self.rtt_ms)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
        if not self.relay.stdout.readline().startswith("ready"):
            raise NetError("the relay did not start")
        self.database_url = self.database_url_for("app")
        seeded = self.call("app", [sys.executable, "seed.py"], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "DATABASE_URL": self.database_url})
        if seeded.returncode:
            raise NetError(f"seed.py on the app host: {seeded.stderr.strip()[-300:]}")

    @property
    def state(self) -> str:
        return str(Path(self.dir, "pg.json"))

    def bouncer(self, role: str, listen: str, server: str) -> int:
        """Start a PgBouncer on ROLE's host in front of SERVER; returns its port."""
        done = self.call(role, [sys.executable, "-m", "kit.pg", "bouncer",
                                str(Path(self.dir, f"pgbouncer-{role}.json")), "--listen",
                                listen, "--server", server, "--pool", str(self.pooler_pool)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "KIT_APP_PASSWORD": self.password})
        if done.returncode:
            raise NetError(f"PgBouncer on {role}: {done.stderr.strip()[-300:]}")
        return port_of(done.stdout)

    def turns(self) -> int:
        """Database round trips through the relay so far."""
        self.relay.send_signal(signal.SIGUSR1)
        return int(self.relay.stdout.readline().split()[1])

    def down(self) -> None:
        """Stop PostgreSQL, kill what runs inside, delete the namespaces (and their links)."""
        if self.relay is not None:  # our child: reaped here, not left a zombie below
            self.relay.terminate()
            try:
                self.relay.wait(5)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
            self.relay.stdout.close()
        for state in Path(self.dir).glob("*.json"):  # PostgreSQL, any PgBouncer
            subprocess.run([sys.executable, "-m", "kit.pg", "stop", str(state)],
                           capture_output=True, cwd=ROOT)
        for role in self.roles:
            pids = subprocess.run(["ip", "netns", "pids", self.ns(role)], capture_output=True,
                                  text=True).stdout.split()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), sig)
                deadline = time.monotonic() + 5
                while pids and time.monotonic() < deadline and any(
                        Path(f"/proc/{pid}").exists() for pid in pids):
                    time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", self.ns(role)], capture_output=True)
            shutil.rmtree(Path("/etc/netns", self.ns(role)), ignore_errors=True)  # resolv.conf
        shutil.rmtree(self.dir, ignore_errors=True)
        _in_use.discard(self.tag)


# what hosts() makes, each name ending in its maker's tag (PIDxN): namespaces and their
# /etc/netns folders, veth links, and the state folder in /tmp (mkdtemp's random tail after it)
MADE = re.compile(r"(?:kit-(?:client|app\d?|relay|pgb|db)-|k\d+[ab])(\d+x\d+)"
                  r"|kit-net-(\d+x\d+)-\w+")


def tag_of(name: str) -> str | None:
    """The tag (PIDxN) in NAME (a path's last part), None when hosts() did not make it."""
    found = MADE.fullmatch(Path(name).name)
    return (found[1] or found[2]) if found else None


def maker(name: str) -> int | None:
    """The pid of the process that made NAME, None when hosts() did not."""
    tag = tag_of(name)
    return int(tag.split("x")[0]) if tag else None


def made() -> dict[str, list[str]]:
    """Everything hosts() makes that exists now, by kind: namespaces, veth links in ours,
    /etc/netns and /tmp/kit-net-* folders (tag_of() names the maker of each)."""
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found = {
        "netns": [line.split()[0] for line in spaces.splitlines() if line.strip()],
        "link": [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()],
        "folder": [str(path) for folder in ("/etc/netns", "/tmp") if Path(folder).is_dir()
                   for path in Path(folder).iterdir()],
    }
    return {kind: [name for name in names if tag_of(name)] for kind, names in found.items()}


def orphans() -> dict[str, list[str]]:
    """What made() lists whose maker has ended: what runs left. A live maker's (another run
    beside this one, or this process's hosts in use) are not; this pid's others are (a dead
    run's pid, reused)."""

    def left(name: str) -> bool:
        if tag_of(name) in _in_use:
            return False
        pid = maker(name)
        return pid == os.getpid() or not pg.alive(pid)
    return {kind: [name for name in names if left(name)] for kind, names in made().items()}


def kill_until_gone(find, seconds: float = 5.0) -> None:
    """SIGKILL what FIND() lists until it lists nothing (a process forked meanwhile, pg_ctl's
    postmaster, is found on the next turn), for up to SECONDS."""
    deadline = time.monotonic() + seconds
    while (pids := find()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def in_netns(name: str) -> list[int]:
    return [int(pid) for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                               text=True).stdout.split()]


def working_in(folder: str) -> list[int]:
    """Processes that work in FOLDER: their working folder inside it (a postmaster works in its
    data folder) or an argument inside it (`pgbouncer -d FOLDER/pgbouncer.ini`). Found by
    what they are, never by a pid a state file recorded, which a reboot may have given to
    another process."""
    found = []
    for pid, args in pg.command_lines():
        with contextlib.suppress(OSError):
            paths = [Path(os.readlink(f"/proc/{pid}/cwd"))] + [
                Path(os.fsdecode(arg)) for arg in args if arg.startswith(b"/")]
            if any(path.is_relative_to(folder) for path in paths):
                found.append(pid)
    return found


def sweep() -> list[str]:
    """Remove what orphans() finds: a namespace's processes, then the namespace; a state
    folder's PostgreSQL and PgBouncer folders (kit-pg-*, kit-pgbouncer-*) with anything still
    working in them, then the folder. Returns the names removed; quiet when another sweep (a
    run beside this one) got there first."""
    left = orphans()
    for name in left["netns"]:
        kill_until_gone(lambda: in_netns(name))
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for name in left["link"]:  # a pair made but not yet moved into its namespaces
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    for folder in left["folder"]:
        for state in Path(folder).glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                recorded = json.loads(state.read_text())
                made = Path(recorded.get("bouncer", recorded)["dir"])
                if made.name.startswith(("kit-pg-", "kit-pgbouncer-")):
                    kill_until_gone(lambda: working_in(str(made)))
                    shutil.rmtree(made, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return [name for names in left.values() for name in names]


@contextlib.contextmanager
def hosts(rtt_ms: float, apps: int = 1, pooler: bool = False, max_connections: int = 100,
          pooler_pool: int = 20):
    """The hosts, PostgreSQL on db (seeded) and the relay between the apps and db, for the
    block."""
    reason = why_not()
    if reason:
        raise NetError(reason)
    removed = sweep()
    if removed:
        print(f"kit.net: removed {len(removed)} hosts, links and folders that a killed run left "
              f"behind ({', '.join(removed[:4])}{', …' if len(removed) > 4 else ''})",
              file=sys.stderr)
    net = Hosts(rtt_ms, apps, pooler, pooler_pool)
    try:
        net.up(max_connections)
        yield net
    finally:
        net.down()
