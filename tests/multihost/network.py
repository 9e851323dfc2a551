"""Hosts on one machine: a Linux network namespace per host, joined by veth links to a
bridge that lives in a namespace of its own.

Every address is in 10.203.0.0/24 and exists only inside namespaces this module made;
nothing is routed anywhere else. Namespace names carry the test process's PID, so two
runs on one machine do not meet. ``Network.close`` deletes every namespace (and with
them their links), also after a failure; cutting a host sets its link down (a
partition: packets vanish, nothing is refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.203.0"


def unavailable_reason() -> str | None:
    """Why the namespaces cannot be built here, or ``None``."""
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) to build network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Network:
    """``hosts``: name -> last octet of its address."""

    hosts: dict[str, int]
    tag: str = field(default_factory=lambda: f"f{os.getpid() % 100000}")
    _made: list[str] = field(default_factory=list)

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts[host]}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.tag}-br"

    def _bridge_side(self, host: str) -> str:
        return f"b{self.hosts[host]}{self.tag}"[:15]

    def open(self) -> Network:
        _ip("netns", "add", self.bridge_namespace)
        self._made.append(self.bridge_namespace)
        br = self.bridge_namespace
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for host in self.hosts:
            ns, outer = self.namespace(host), self._bridge_side(host)
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", outer, "netns", br)
            _ip("-n", br, "link", "set", outer, "master", "br0")
            _ip("-n", br, "link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def cut(self, host: str) -> None:
        """Partition ``host``: its link to the bridge goes down."""
        _ip("-n", self.bridge_namespace, "link", "set", self._bridge_side(host), "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.bridge_namespace, "link", "set", self._bridge_side(host), "up")

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)
        self._made.clear()
