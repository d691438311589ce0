#!/usr/bin/env python3
"""A user-space delay line between two TUN devices: netem's `delay` and
`rate` with a drop-tail `limit`, for kernels built without sch_netem.

    delayline.py HOST_IF NS_IF DELAY_MS RATE_BPS LIMIT

Creates TUN devices HOST_IF and NS_IF (they vanish when this process
ends), prints `ready`, then forwards every IP packet read from one to the
other: each direction serialises packets at RATE_BPS bits per second, then
holds each for DELAY_MS before it is delivered. A direction holds at most
LIMIT packets (waiting for the rate and in the delay line, like netem's
limit); more are dropped. The caller moves NS_IF into a namespace and
addresses both ends. Runs until SIGTERM (at most 30 minutes); prints the
counts of each direction to stderr every 5 s and at the end.

Needs root (/dev/net/tun). Used by tests/tests/agents.rs when the kernel has
no netem; scripts/agents/netem.sh runs the test on purpose.
"""

import collections
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_LIFETIME_S = 30 * 60


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    def __init__(self, name, src, dst, delay_s, rate_bps, limit):
        self.name = name
        self.src, self.dst = src, dst
        self.delay_s, self.rate_bps, self.limit = delay_s, rate_bps, limit
        self.q = collections.deque()  # (due, packet), due never decreasing
        self.free_at = 0.0  # when the "wire" finishes the last packet
        self.passed = self.dropped = self.bytes = self.max_q = 0

    def read(self, now):
        for _ in range(512):
            try:
                pkt = os.read(self.src, 65536)
            except BlockingIOError:
                return
            if len(self.q) >= self.limit:
                self.dropped += 1
                continue
            done = max(now, self.free_at) + len(pkt) * 8.0 / self.rate_bps
            self.free_at = done
            self.q.append((done + self.delay_s, pkt))
            self.max_q = max(self.max_q, len(self.q))

    def deliver(self, now):
        q = self.q
        while q and q[0][0] <= now:
            _, pkt = q.popleft()
            try:
                os.write(self.dst, pkt)
                self.passed += 1
                self.bytes += len(pkt)
            except OSError:
                self.dropped += 1

    def due(self):
        return self.q[0][0] if self.q else None

    def stats(self):
        return (f"{self.name}: passed {self.passed} ({self.bytes} B), dropped {self.dropped}, "
                f"most queued {self.max_q}")


def main():
    host_if, ns_if = sys.argv[1], sys.argv[2]
    delay_s = float(sys.argv[3]) / 1000.0
    rate_bps = float(sys.argv[4])
    limit = int(sys.argv[5])
    a = open_tun(host_if)
    b = open_tun(ns_if)
    dirs = {
        a: Direction(f"{host_if}->{ns_if}", a, b, delay_s, rate_bps, limit),
        b: Direction(f"{ns_if}->{host_if}", b, a, delay_s, rate_bps, limit),
    }

    def stop(*_):
        for d in dirs.values():
            print(d.stats(), file=sys.stderr, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"delay {delay_s * 1000:.1f} ms, rate {rate_bps:.0f} bit/s, limit {limit} packets, each way",
          file=sys.stderr, flush=True)
    print("ready", flush=True)
    ep = select.epoll()
    ep.register(a, select.EPOLLIN)
    ep.register(b, select.EPOLLIN)
    started = time.monotonic()
    report = started + 5.0
    while True:
        now = time.monotonic()
        if now - started > MAX_LIFETIME_S:
            stop()
        dues = [d.due() for d in dirs.values() if d.due() is not None]
        timeout = max(0.0, min(dues) - now) if dues else 1.0
        for fd, _ in ep.poll(min(timeout, 1.0)):
            dirs[fd].read(time.monotonic())
        now = time.monotonic()
        for d in dirs.values():
            d.deliver(now)
        if now >= report:
            report = now + 5.0
            for d in dirs.values():
                print(d.stats(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
