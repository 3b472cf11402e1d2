"""The node agent: one per node, runs that node's `torchrun`, forwards signals, reports exits.

    python -m launcher.agent --node NAME [--collector HOST:PORT/attempt<K>] [--stdin-eof-stops]
                             [--grace S] [--probe-listen ADDR:PORT --probe-peers N=ADDR:PORT,...
                             --probe-every S --probe-bytes B] -- torchrun ...

`meshplan run` starts it on every node with the cluster's own launcher: directly (one machine),
`ip netns exec NS` (the network-namespace test cluster), `ssh HOST` (a host list) or
`srun --nodes=1 --ntasks=1 --nodelist=HOST` (inside a SLURM allocation). The agent

* starts torchrun in its own session (and asks the kernel to SIGTERM it if the agent dies);
* forwards SIGTERM/SIGINT/SIGHUP to torchrun (which stops its workers), and after `--grace`
  seconds SIGKILLs every process it saw under torchrun, so nothing is orphaned;
* with `--stdin-eof-stops`, treats the end of its standard input as SIGTERM: `ssh` does not
  forward signals, but it closes the remote stdin when the supervisor kills the ssh client;
* when torchrun exits, sends `{"ev": "exit", "node", "code"}` to the supervisor's collector
  (`ATTEMPT/monitor/agents.jsonl`), prints one line, and exits with torchrun's status
  (128 + N for a signal N), which the wrapper (ssh, srun, ip netns exec) passes on;
* with `--probe-listen` and `--probe-peers`, serves a probe sink on its host's address and
  times bulk transfers to the other agents, reported as `link` records
  (`launcher.link_probe`: how a slow host pair is found when the job's rings cannot say).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .collector import Endpoint, Sender, split_host_port
from .link_probe import ProbeConfig, run_prober, serve_sink
from .procs import process_tree, teardown


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM it when the agent dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m launcher.agent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", required=True, help="plan node name this agent runs")
    ap.add_argument("--collector", help="HOST:PORT/attempt<K> of the supervisor's collector")
    ap.add_argument("--stdin-eof-stops", action="store_true",
                    help="stop torchrun when standard input closes (ssh)")
    ap.add_argument("--grace", type=float, default=5.0, help="SIGTERM -> SIGKILL seconds")
    ap.add_argument("--probe-listen", metavar="ADDR:PORT",
                    help="serve the link-probe sink here (this host's cluster address)")
    ap.add_argument("--probe-peers", metavar="NODE=ADDR:PORT,...", default="",
                    help="the other agents' probe sinks")
    ap.add_argument("--probe-every", type=float, default=ProbeConfig().period_s,
                    help="seconds between probe rounds")
    ap.add_argument("--probe-bytes", type=int, default=ProbeConfig().nbytes, help="bytes per probe")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- torchrun ...")
    args = ap.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        ap.error("give the command to run after --, e.g. -- torchrun ...")
    try:
        args.probe_listen = _addr(args.probe_listen) if args.probe_listen else None
        args.probe_peers = dict((n, _addr(a)) for n, _, a in
                                (item.partition("=") for item in args.probe_peers.split(",") if item))
    except ValueError as exc:
        ap.error(str(exc))
    if not (args.probe_every > 0 and 0 < args.probe_bytes <= 1 << 30):
        ap.error("--probe-every must be > 0 and --probe-bytes in 1..2**30")
    return args


def _addr(text: str) -> tuple[str, int]:
    hp = split_host_port(text)
    if hp is None:
        raise ValueError(f"bad probe address {text!r}: expected ADDR:PORT")
    return hp[0].strip("[]"), hp[1]


def start_probes(args: argparse.Namespace, sender: Sender | None) -> threading.Event | None:
    """Serve the probe sink and start probing the peers (when asked and there are peers to
    report to); returns the event that stops the prober."""
    if sender is None or args.probe_listen is None or not args.probe_peers:
        return None
    try:
        sink = serve_sink(*args.probe_listen)
    except OSError as exc:
        print(f"meshplan agent {args.node}: link probes off: cannot listen on "
              f"{args.probe_listen[0]}:{args.probe_listen[1]}: {exc}", file=sys.stderr)
        return None
    stop = threading.Event()
    cfg = ProbeConfig(period_s=args.probe_every, nbytes=args.probe_bytes)
    run_prober(args.node, args.probe_peers, cfg, sender.send, stop)
    threading.Thread(target=lambda: (stop.wait(), sink.close()), daemon=True).start()
    return stop


def exit_status(code: int) -> int:
    """Popen's returncode (negative for a signal) as a shell exit status."""
    return 128 - code if code < 0 else code


def run(args: argparse.Namespace) -> int:
    """Run the command to its end (or until told to stop); returns the exit status."""
    sender = None
    if args.collector:
        try:
            sender = Sender(Endpoint.parse(args.collector), {"agent": args.node})
        except ValueError as exc:
            print(f"meshplan agent: {exc}; exits are not reported", file=sys.stderr)
    try:
        child = subprocess.Popen(args.command, start_new_session=True, preexec_fn=_term_with_parent,
                                 stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"meshplan agent {args.node}: cannot start {args.command[0]}: {exc}", file=sys.stderr)
        return 127
    known: dict[int, int] = {}
    stopping = threading.Event()

    def stop(reason: str) -> None:
        if not stopping.is_set():
            stopping.set()
            print(f"meshplan agent {args.node}: {reason}; stopping torchrun", flush=True)

    def on_signal(signum: int, frame: object) -> None:
        stop(f"got signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.stdin_eof_stops:
        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read1(4096):
                    pass
            except (OSError, ValueError):
                pass
            stop("standard input closed (supervisor gone)")

        threading.Thread(target=watch_stdin, daemon=True, name="meshplan-agent-stdin").start()
    if sender is not None:
        sender.send({"ev": "start", "node": args.node, "pid": os.getpid(), "t": time.time(),
                     "host": socket.gethostname(),
                     # set when srun started the agent: which job step it is
                     "slurm_step": os.environ.get("SLURM_STEP_ID")})
    probing = start_probes(args, sender)
    print(f"meshplan agent {args.node}: started {args.command[0]} (pid {child.pid})", flush=True)
    seen_t = 0.0
    while child.poll() is None and not stopping.is_set():
        if time.monotonic() - seen_t > 1.0:
            known.update(process_tree(child.pid))
            seen_t = time.monotonic()
        stopping.wait(0.1)
    if child.poll() is None:
        teardown([child], known, args.grace)
    code = exit_status(child.wait())
    if probing is not None:
        probing.set()
    print(f"meshplan agent {args.node}: torchrun exited with status {code}", flush=True)
    if sender is not None:
        sender.send({"ev": "exit", "node": args.node, "code": code, "t": time.time()})
        sender.close(timeout_s=2.0)
    return code


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
