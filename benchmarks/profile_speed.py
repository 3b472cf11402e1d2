"""How long `meshplan profile --quick` takes on a real 4-host cluster (issue target: <= 60 s),
and how close its pair bandwidths come to the configured rates.

Builds the same network-namespace cluster as tests/test_profiler_netns.py (4 hosts, three at
400 Mbit/s and one at 50 Mbit/s, one degraded 100 Mbit/s pair, tc-shaped both ways), starts
one torchrun agent per namespace, and prints the time until cluster.yaml is written and until
every agent has exited (torch start-up included). Needs root and iproute2.

Run: sudo python benchmarks/profile_speed.py [--full]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from netns_cluster import NetnsCluster, why_not_available  # noqa: E402

from planner.specfiles import load_cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="profile without --quick")
    args = ap.parse_args()
    reason = why_not_available()
    if reason:
        sys.exit(f"error: cannot build the namespace cluster: {reason}")
    cluster = NetnsCluster()
    try:
        cluster.setup()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cluster.yaml"
            cmd = ["--no-python", "meshplan", "profile", "-o", str(out)]
            start = time.time()
            results = cluster.torchrun(cmd + ([] if args.full else ["--quick"]), timeout_s=300,
                                       log_dir=Path(tmp))
            exited = time.time() - start
            if not out.exists() or any(code for code, _ in results):
                sys.exit("error: the profile failed:\n" + results[0][1][-2000:])
            written = out.stat().st_mtime - start
            spec = load_cluster(str(out))
            worst = 0.0
            for i in range(4):
                for j in range(4):
                    if i != j:
                        want = cluster.pair_rate_mbit(i, j) * 1e6 / 8 / 1e9
                        worst = max(worst, abs(spec.bandwidth_GBps[i][j] / want - 1))
    finally:
        cluster.teardown()
    mode = "full" if args.full else "quick"
    print(f"{mode} 4-host profile: cluster.yaml written after {written:.1f} s, all agents "
          f"exited after {exited:.1f} s (target <= 60 s); worst pair bandwidth error "
          f"{100 * worst:.1f}% (tolerance 25%)")


if __name__ == "__main__":
    main()
