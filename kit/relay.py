"""A TCP relay that adds a round-trip time: each chunk is forwarded RTT/2 after it arrived.

    python -m kit.relay --listen 10.213.2.2:5432 --to 10.213.3.2:5432 --rtt-ms 5

This machine's kernel has no netem, so latency comes from user space: per connection and
direction, one thread reads and stamps each chunk, another sends it at stamp + RTT/2, in
order. Threads and time.sleep, not asyncio: epoll's millisecond timeouts would round a 0.5 ms
delay up to 1 ms. It prints `ready PORT` once listening, and on SIGUSR1 `turns N`: the client
chunks that followed a server one, i.e. the database round trips so far. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import queue
import signal
import socket
import sys
import threading
import time

SPIN = 0.0002  # seconds before a chunk is due when the sender stops sleeping and spins
turns = 0  # client->server chunks that follow a server->client one: database round trips
turns_lock = threading.Lock()


def pump(src: socket.socket, dst: socket.socket, delay: float, upstream: bool,
         last: list) -> None:
    """Forward src to dst, each chunk delay seconds after it arrived; close dst at the end."""
    global turns
    chunks: queue.Queue = queue.Queue()

    def deliver() -> None:
        while (item := chunks.get()) is not None:
            due, data = item
            if (wait := due - time.perf_counter()) > SPIN:
                time.sleep(wait - SPIN)  # sleep overshoots by tens of microseconds ...
            while time.perf_counter() < due:  # ... so the last stretch is spun
                pass
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    try:
        while data := src.recv(65536):
            if upstream and last[0] == "down":
                with turns_lock:
                    turns += 1
            last[0] = "up" if upstream else "down"
            chunks.put((time.perf_counter() + delay, data))
    except OSError:
        pass
    chunks.put(None)
    sender.join()


def serve(listen: tuple[str, int], to: tuple[str, int], rtt: float) -> None:
    server = socket.create_server(listen, backlog=512)
    # Python runs signal handlers in the main thread only; a SIGTERM the kernel hands to a
    # pump thread would wait for the next accept. Waking twice a second runs it promptly.
    server.settimeout(0.5)
    print(f"ready {server.getsockname()[1]}", flush=True)
    while True:
        try:
            client, _ = server.accept()
        except TimeoutError:
            continue
        client.settimeout(None)
        threading.Thread(target=connect, args=(client, to, rtt), daemon=True).start()


def connect(client: socket.socket, to: tuple[str, int], rtt: float) -> None:
    """Join one client to the server (in its own thread: a partition stalls only this)."""
    try:
        upstream = socket.create_connection(to, timeout=30)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    last = ["down"]  # the server speaks last before the first client chunk
    threading.Thread(target=pump, args=(client, upstream, rtt / 2, True, last),
                     daemon=True).start()
    pump(upstream, client, rtt / 2, False, last)


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=address, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=address, required=True, metavar="HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGUSR1, lambda *_: print(f"turns {turns}", flush=True))
    serve(args.listen, args.to, args.rtt_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
