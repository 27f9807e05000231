"""A DNS server that answers slowly, for the resolver trap: one name, after DELAY seconds.

    python -m kit.resolver NAME ADDRESS [--delay 2] [--listen 127.0.0.1:53]

Answers A queries for NAME with ADDRESS, and AAAA queries with no address, each after DELAY
seconds (a slow or distant resolver); any other name at once with NXDOMAIN. Each query is
answered in a thread of its own, so queries overlap as a real resolver's would. kit.dnstrap
runs it inside a kit.net host whose /etc/netns/HOST/resolv.conf points at it. Prints "ready".
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time


def question(packet: bytes) -> tuple[str, int, int]:
    """(name, qtype, end of the question) of a DNS query."""
    labels, at = [], 12
    while packet[at]:
        labels.append(packet[at + 1:at + 1 + packet[at]].decode("ascii", "replace"))
        at += 1 + packet[at]
    qtype = struct.unpack("!H", packet[at + 1:at + 3])[0]
    return ".".join(labels).lower(), qtype, at + 5


def answer(packet: bytes, name: str, address: str) -> tuple[bytes, bool]:
    """The response, and whether it is for NAME (to be delayed)."""
    asked, qtype, end = question(packet)
    ours = asked == name.lower()
    flags = 0x8180 if ours else 0x8183  # a response, recursion available; 3: NXDOMAIN
    records = b""
    if ours and qtype == 1:  # A: one record, a pointer to the name in the question
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address)
    head = packet[:2] + struct.pack("!HHHHH", flags, 1, 1 if records else 0, 0, 0)
    return head + packet[12:end] + records, ours


def serve(listen: str, name: str, address: str, delay: float) -> None:
    host, port = listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    print("ready", flush=True)

    def respond(packet: bytes, peer) -> None:
        try:
            response, ours = answer(packet, name, address)
        except (IndexError, struct.error):
            return  # not a query we understand: no answer
        if ours:
            time.sleep(delay)
        sock.sendto(response, peer)

    while True:
        packet, peer = sock.recvfrom(512)
        threading.Thread(target=respond, args=(packet, peer), daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("address")
    parser.add_argument("--delay", type=float, default=2.0)
    parser.add_argument("--listen", default="127.0.0.1:53")
    args = parser.parse_args()
    try:
        serve(args.listen, args.name, args.address, args.delay)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
