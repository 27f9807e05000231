"""Start a scenario of kit.scenarios under gunicorn from Python (the tests and bench/ use it).

    with serve("green", requests=30, log=Path("g.log"), env={"POOL_SIZE": "30"}) as server:
        print(server.url, server.health())

run_all.sh starts the same command lines from the shell (`python -m kit.scenarios command`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kit.pg import free_port
from kit.scenarios import BLOCKED_MARK, BY_NAME

ROOT = Path(__file__).resolve().parent.parent


def kit_env(**extra) -> dict[str, str]:
    """Our environment with this Python's bin folder first on PATH, plus extra."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
            return json.load(answer)

    def blocked_reports(self) -> int:
        """How often gevent's monitor said the event loop was blocked."""
        return self.log.read_text().count(BLOCKED_MARK)

    def wait_ready(self, seconds: float = 30) -> None:
        """Poll /health until it answers; raise with the log's tail if it dies or times out."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.health()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited: {self.log.read_text()[-1500:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn not ready after {seconds:g} s: "
                                       f"{self.log.read_text()[-1500:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(scenario: str, log: Path, requests: int = 5, workers: int = 1,
          env: dict | None = None) -> Server:
    """Start the scenario on a free port of 127.0.0.1 and wait until it answers."""
    port = free_port()
    argv = BY_NAME[scenario].command(port, requests, workers)
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=kit_env(**(env or {})), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, Path(log))
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def run_load(*args, out: Path, report=subprocess.DEVNULL) -> dict | None:
    """Run load.py as a user would, with --no-lines --json OUT; returns its first result.

    report: where its printed report goes (default: nowhere; sys.stderr to show it)."""
    subprocess.run([sys.executable, "load.py", *map(str, args), "--no-lines", "--json",
                    str(out)], cwd=ROOT, env=kit_env(), check=False, stdout=report,
                   stderr=subprocess.DEVNULL if report == subprocess.DEVNULL else None)
    return json.loads(out.read_text())["results"][0] if out.exists() else None


@contextlib.contextmanager
def serve(scenario: str, log: Path, requests: int = 5, workers: int = 1,
          env: dict | None = None):
    server = start(scenario, log, requests, workers, env)
    try:
        yield server
    finally:
        server.stop()
