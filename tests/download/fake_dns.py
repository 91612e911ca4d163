"""A network for the guard's tests: host names answered as a test says (a DNS rebinding attack without DNS), and
every address a socket is about to connect to recorded; only loopback is really connected to, a public address
is refused without touching the network. For the test's own process (monkeypatch socket's two functions with a
FakeNetwork's), or for the download stage's spawned workers (start_worker, their initializer, reads the answers
from the environment)."""
from __future__ import annotations

import ipaddress
import json
import os
import socket

ANSWERS_ENV, LOG_ENV = "TEST_FAKE_DNS", "TEST_FAKE_DNS_LOG"
PUBLIC = "93.184.216.34"  # a global address: the guard lets it through, and FakeNetwork refuses to connect to it
_real_getaddrinfo, _real_create_connection = socket.getaddrinfo, socket.create_connection


class FakeNetwork:
    def __init__(self, answers: dict[str, list], log_path) -> None:
        """answers: host -> the answer of each successive lookup (an address or a list of them; the last repeats)."""
        self.answers, self.log_path, self.lookups = answers, str(log_path), {}

    def getaddrinfo(self, host, port, *args, **kwargs):
        if host not in self.answers:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        count = self.lookups[host] = self.lookups.get(host, 0) + 1
        answer = self.answers[host][min(count, len(self.answers[host])) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                for ip in ([answer] if isinstance(answer, str) else answer)]

    def create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        host, port = address[:2]
        try:
            targets = [str(ipaddress.ip_address(host))]
        except ValueError:  # a host name: resolved here as the real create_connection would
            targets = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        for ip in targets:
            with open(self.log_path, "a") as log:
                log.write(ip + "\n")
            if ipaddress.ip_address(ip).is_loopback:
                return _real_create_connection((ip, port), timeout, source_address)
        raise ConnectionRefusedError(f"test network: only loopback is reachable, not {targets}")

    def connected(self) -> list[str]:
        """Every address a connection was attempted to, in order."""
        return open(self.log_path).read().split() if os.path.exists(self.log_path) else []


def start_worker() -> None:
    """img2dataset_pool's worker initializer, on a FakeNetwork answering as TEST_FAKE_DNS says."""
    network = FakeNetwork(json.loads(os.environ[ANSWERS_ENV]), os.environ[LOG_ENV])
    socket.getaddrinfo, socket.create_connection = network.getaddrinfo, network.create_connection
    from components.download import img2dataset_pool

    img2dataset_pool._start_worker()
