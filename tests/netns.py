"""Hosts in network namespaces: each "host" its own network stack and address, joined
by veth pairs to a bridge, as a rack of machines would be by a switch.

The bridge lives in a namespace of its own, so the root namespace's firewall (a
container host often drops forwarded traffic) never sees the hosts' traffic; the test
process reaches every host through one more veth into that bridge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"sm-probe-{os.getpid()}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class Hosts:
    """Named hosts on 10.<a>.<b>.0/24; the test process is .1, hosts are .2 and up."""

    def __init__(self, names: Sequence[str]) -> None:
        tag = os.getpid() % 10_000
        self._prefix = f"sm{tag}"
        self.subnet = f"10.213.{tag % 250 + 1}"
        self.switch = f"{self._prefix}-switch"
        self.address = {name: f"{self.subnet}.{i + 2}" for i, name in enumerate(names)}
        self.namespace = {name: f"{self._prefix}-{name}" for name in names}
        self._uplink = f"{self._prefix}up"

    def wrapper(self, name: str) -> list[str]:
        """The command prefix that runs a program on host ``name``."""
        return ["ip", "netns", "exec", self.namespace[name]]

    def create(self) -> None:
        ip("netns", "add", self.switch)
        self._in(self.switch, "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "link", "set", "br0", "up")
        # The test process's own leg.
        ip("link", "add", self._uplink, "type", "veth", "peer", "name", f"{self._prefix}upx")
        self._plug(f"{self._prefix}upx")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self._uplink)
        ip("link", "set", self._uplink, "up")
        for i, (name, namespace) in enumerate(self.namespace.items()):
            ip("netns", "add", namespace)
            inside, outside = f"{self._prefix}h{i}", f"{self._prefix}h{i}x"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            self._plug(outside)
            ip("link", "set", inside, "netns", namespace)
            self._in(namespace, "link", "set", "lo", "up")
            self._in(namespace, "addr", "add", f"{self.address[name]}/24", "dev", inside)
            self._in(namespace, "link", "set", inside, "up")

    def destroy(self) -> None:
        """Remove every namespace (their veths go with them) and the test's leg."""
        subprocess.run(["ip", "link", "del", self._uplink], capture_output=True, check=False)
        for namespace in [*self.namespace.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)

    def _plug(self, device: str) -> None:
        """Move one veth end into the switch namespace and onto its bridge."""
        ip("link", "set", device, "netns", self.switch)
        self._in(self.switch, "link", "set", device, "master", "br0")
        self._in(self.switch, "link", "set", device, "up")

    def _in(self, namespace: str, *args: str) -> None:
        ip("-n", namespace, *args)
