"""Hosts on one machine: network namespaces for the client, the app, a latency relay and the DB.

    with hosts(rtt_ms=5) as net:       # root only (CAP_NET_ADMIN)
        net.run("app", ["gunicorn", ...]); net.database_url; net.turns()

    client 10.213.1.1 ── app 10.213.1.2 / 10.213.2.1 ── relay 10.213.2.2 / 10.213.3.1 ── db 10.213.3.2

Each host is a namespace with its own network stack, joined by veth pairs, with no route past
its neighbours: the app reaches PostgreSQL only through the relay (kit.relay), which adds the
round-trip time. No address here exists outside these namespaces. Everything is removed on
the way out: the processes inside, then the namespaces, which take their links with them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ["client", "app", "relay", "db"]
LINKS = [("client", "10.213.1.1", "app", "10.213.1.2"),
         ("app", "10.213.2.1", "relay", "10.213.2.2"),
         ("relay", "10.213.3.1", "db", "10.213.3.2")]
ADDRESS = {"client": "10.213.1.1", "app": "10.213.1.2", "relay": "10.213.2.2",
           "db": "10.213.3.2"}  # where each host is reached from its client side
DB_PORT = 5432


class NetError(RuntimeError):
    """One line: why the hosts could not be made."""


def why_not() -> str | None:
    """Why this process cannot make hosts, or None when it can."""
    if os.geteuid() != 0:
        return "--rtt makes network namespaces, which needs root (CAP_NET_ADMIN)"
    if not shutil.which("ip"):
        return "--rtt needs iproute2's `ip` (apt-get install iproute2)"
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NetError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    rtt_ms: float
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kit-net-", dir="/tmp"))
    database_url: str = ""
    relay: subprocess.Popen | None = None

    def ns(self, role: str) -> str:
        return f"kit-{role}-{self.tag}"

    def exec(self, role: str) -> list[str]:
        """The prefix that runs a command on ROLE's host."""
        return ["ip", "netns", "exec", self.ns(role)]

    def run(self, role: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.exec(role), *argv], **kw)

    def call(self, role: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.exec(role), *argv], **kw)

    def up(self) -> None:
        for role in ROLES:
            ip("netns", "add", self.ns(role))
            ip("-n", self.ns(role), "link", "set", "lo", "up")
        for left, left_ip, right, right_ip in LINKS:
            a, b = f"k{left[0]}{right[0]}{self.tag}", f"k{right[0]}{left[0]}{self.tag}"
            ip("link", "add", a, "type", "veth", "peer", "name", b)
            for dev, role, address in ((a, left, left_ip), (b, right, right_ip)):
                ip("link", "set", dev, "netns", self.ns(role))
                ip("-n", self.ns(role), "addr", "add", f"{address}/24", "dev", dev)
                ip("-n", self.ns(role), "link", "set", dev, "up")
        started = self.call("db", [sys.executable, "-m", "kit.pg", "start", self.state,
                                   "--listen", ADDRESS["db"]], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
        if started.returncode:
            raise NetError(f"PostgreSQL on the db host: {started.stderr.strip()[-300:]}")
        port = started.stdout.strip().rsplit(":", 1)[1].split("/")[0]
        self.relay = self.run("relay", [sys.executable, "-m", "kit.relay", "--listen",
                                        f"{ADDRESS['relay']}:{DB_PORT}", "--to",
                                        f"{ADDRESS['db']}:{port}", "--rtt-ms", str(self.rtt_ms)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
        if not self.relay.stdout.readline().startswith("ready"):
            raise NetError("the relay did not start")
        self.database_url = f"postgresql://app@{ADDRESS['relay']}:{DB_PORT}/app"

    @property
    def state(self) -> str:
        return str(Path(self.dir, "pg.json"))

    def turns(self) -> int:
        """Database round trips through the relay so far."""
        self.relay.send_signal(signal.SIGUSR1)
        return int(self.relay.stdout.readline().split()[1])

    def down(self) -> None:
        """Stop PostgreSQL, kill what runs inside, delete the namespaces (and their links)."""
        if self.relay is not None:  # our child: reaped here, not left a zombie below
            self.relay.terminate()
            self.relay.wait(5)
            self.relay.stdout.close()
        if Path(self.state).exists():
            self.call("db", [sys.executable, "-m", "kit.pg", "stop", self.state],
                      capture_output=True, cwd=Path(__file__).parent.parent)
        for role in ROLES:
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
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def hosts(rtt_ms: float):
    """The four hosts, PostgreSQL on db and the relay between app and db, for the block."""
    reason = why_not()
    if reason:
        raise NetError(reason)
    net = Hosts(rtt_ms)
    try:
        net.up()
        yield net
    finally:
        net.down()
