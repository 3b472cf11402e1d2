"""A one-node SLURM cluster on this machine: munged + slurmctld + slurmd, all private.

Everything lives under one directory (config, state, spool, logs, munge socket and key) and
uses free TCP ports, so it neither needs nor touches a system SLURM or munge setup. The node
line comes from `slurmd -C` (the machine's real CPUs and memory). Debian's `slurm-wlm` and
`munge` provide the daemons; root is needed (slurmd starts jobs as their user).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the SLURM test needs root (slurmd runs jobs as their user)"
    lacking = [d for d in DAEMONS if shutil.which(d) is None
               and not Path(f"/usr/sbin/{d}").exists()]
    if lacking:
        return f"{', '.join(lacking)} not installed (apt-get install slurm-wlm munge)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SlurmCluster:
    root: Path
    env: dict[str, str]
    """Environment for sbatch/scontrol (SLURM_CONF)."""
    procs: tuple[subprocess.Popen, ...]

    def run(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_exe(argv[0]), *argv[1:]], env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _node_line() -> str:
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def _write_conf(root: Path, host: str, sock: Path) -> Path:
    ctl, slurmd = _free_port(), _free_port()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=meshplan", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        f"SlurmctldPort={ctl}", f"SlurmdPort={slurmd}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU_Memory",
        "SchedulerType=sched/builtin", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5",
        _node_line() + " State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


def _start_munge(root: Path) -> tuple[subprocess.Popen, Path]:
    sock, key = root / "munge.sock", root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    proc = subprocess.Popen(
        [_exe("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
         f"--seed-file={root / 'munge.seed'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _wait(lambda: sock.exists(), 10, "munged socket")
    return proc, sock


def _wait(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def start(root: Path) -> SlurmCluster:
    """Start the cluster under root and wait until its node is idle."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    munge, sock = _start_munge(root)
    conf = _write_conf(root, host, sock)
    env = dict(os.environ, SLURM_CONF=str(conf))
    ctld = subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    slurmd = subprocess.Popen([_exe("slurmd"), "-D", "-f", str(conf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cluster = SlurmCluster(root, env, (munge, ctld, slurmd))

    def idle() -> bool:
        out = cluster.run("scontrol", "show", "node", host, timeout_s=10).stdout
        return "State=IDLE" in out

    try:
        _wait(idle, 40, "SLURM node")
    except TimeoutError:
        logs = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"SLURM did not come up:\n{logs}") from None
    return cluster
