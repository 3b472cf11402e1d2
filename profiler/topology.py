"""Node topology: `nvidia-smi topo -m` and NIC types/rates from sysfs.

Sources: /sys/class/infiniband/<dev>/ports/<port>/{link_layer,rate,state} (link_layer
"InfiniBand" -> infiniband, "Ethernet" on an RDMA device -> roce), /sys/class/net/<if>/speed
(Mb/s; -1 or unreadable when unknown, e.g. loopback) and operstate.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

SYS = Path("/sys")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # absent attribute, or EINVAL (speed of a down/virtual link)
        return None


def parse_rate_Gbps(rate: str | None) -> float | None:
    """'400 Gb/sec (4X NDR)' -> 400.0; None when unparseable."""
    match = re.match(r"\s*([\d.]+)\s*Gb/sec", rate or "")
    return float(match.group(1)) if match else None


def read_ib_ports(sys_root: Path = SYS) -> list[dict]:
    """One dict per RDMA port: device, port, link_layer, state, rate_Gbps."""
    ports = []
    base = sys_root / "class" / "infiniband"
    for dev in sorted(base.iterdir()) if base.is_dir() else []:
        for port in sorted((dev / "ports").iterdir()) if (dev / "ports").is_dir() else []:
            state = _read(port / "state") or ""
            ports.append({
                "device": dev.name, "port": port.name,
                "link_layer": _read(port / "link_layer") or "unknown",
                "state": state.split(":")[-1].strip() or "unknown",  # "4: ACTIVE" -> ACTIVE
                "rate_Gbps": parse_rate_Gbps(_read(port / "rate")),
            })
    return ports


def read_net_ifaces(sys_root: Path = SYS) -> list[dict]:
    """One dict per network interface: name, operstate, speed_Mbps (None when unknown)."""
    out = []
    base = sys_root / "class" / "net"
    for iface in sorted(base.iterdir()) if base.is_dir() else []:
        speed = _read(iface / "speed")
        speed_Mbps = int(speed) if speed and speed.lstrip("-").isdigit() else None
        out.append({"name": iface.name, "operstate": _read(iface / "operstate") or "unknown",
                    "speed_Mbps": speed_Mbps if speed_Mbps and speed_Mbps > 0 else None})
    return out


def nic_kind(ib_ports: list[dict], net_ifaces: list[dict], socket_ifname: str | None) -> str:
    """The node's inter-node NIC kind: infiniband > roce > ethernet > loopback.

    An active RDMA port decides (NCCL prefers it). Otherwise the interface the process group
    binds (GLOO/NCCL_SOCKET_IFNAME) decides: `lo` means the "nodes" share one host.
    """
    active = [p for p in ib_ports if p["state"] == "ACTIVE"]
    if any(p["link_layer"] == "InfiniBand" for p in active):
        return "infiniband"
    if any(p["link_layer"] == "Ethernet" for p in active):
        return "roce"
    if socket_ifname:
        return "loopback" if socket_ifname.split(",")[0] == "lo" else "ethernet"
    up = [i for i in net_ifaces if i["name"] != "lo" and i["operstate"] in ("up", "unknown")]
    return "ethernet" if up else "loopback"


def socket_ifname() -> str | None:
    """The interface the process group was told to bind (gloo or NCCL), if any."""
    return os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")


def ipv4_of(ifname: str) -> str | None:
    """IPv4 address of an interface (SIOCGIFADDR ioctl); None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def nic_report(sys_root: Path = SYS) -> dict:
    """Everything this node knows about its NICs, plus the derived kind."""
    ib, net = read_ib_ports(sys_root), read_net_ifaces(sys_root)
    ifname = socket_ifname()
    report = {"kind": nic_kind(ib, net, ifname), "infiniband": ib, "net": net}
    if ifname:
        first = ifname.split(",")[0].lstrip("^=")
        report["socket_ifname"] = ifname
        report["socket_ipv4"] = ipv4_of(first)
    return report


def parse_topo_matrix(text: str) -> dict:
    """Parse `nvidia-smi topo -m`: {'matrix': {row: {col: link}}, 'nic_legend': {NIC0: mlx5_0}}.

    The matrix is the tab-separated block up to the first blank line; its header names the
    columns (GPU0.., NIC0.., then CPU/NUMA affinity columns, kept as given).
    """
    lines = text.splitlines()
    matrix: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in lines:
        if not line.strip():
            if header:
                break
            continue
        cells = [c.strip() for c in re.split(r"\t+|\s{2,}", line.strip()) if c.strip()]
        if not header:
            header = cells
            continue
        matrix[cells[0]] = dict(zip(header, cells[1:], strict=False))
    legend = dict(re.findall(r"^\s*(NIC\d+):\s*(\S+)\s*$", text, flags=re.MULTILINE))
    return {"matrix": matrix, "nic_legend": legend}


def nvidia_topology(timeout_s: float = 20.0) -> dict | None:
    """`nvidia-smi topo -m` parsed, or None without nvidia-smi (CPU machines)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[0:1]}
    return parse_topo_matrix(proc.stdout)


def has_nvlink(topology: dict | None) -> bool:
    """True when any GPU-GPU cell of the matrix is NV<k> (NVLink/NVSwitch)."""
    matrix = (topology or {}).get("matrix", {})
    return any(v.startswith("NV") for row, cols in matrix.items() if row.startswith("GPU")
               for col, v in cols.items() if col.startswith("GPU"))
