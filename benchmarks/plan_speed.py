"""How fast `meshplan plan` is on six planning problems (issue 3's targets: (b) <= 5 s and
(a) <= 2 s wall on a 2-core machine; issue 12 tightened (b) to <= 1 s).

  (a) GPT-3-style 530B (Turing-530B shape) on 5128 A100 (641 DGX nodes), seq 2048, GBS 2520
  (b) Llama 3.1 405B on 16,384 H100 (2048 nodes), seq 8192, GBS 2048 (issue 12: <= 1 s)
  (c) Llama 3.1 70B on 64 H100 (8 nodes), seq 8192, GBS 128
  (d) Llama 3.1 405B on 100,000 H100 (12,500 nodes), seq 8192, GBS 16384 (goal <= 2 s); no
      layout uses all 12,500 nodes, so the planner also finds the largest usable subset
  (e) DeepSeek-V3 on 16,384 H100 (2048 nodes), seq 4096, GBS 8192, ep/etp searched (MoE issue:
      <= 2 s)
  (f) Llama 3.1 405B on 16,384 GB200 (4096 NVL72 trays, 228 racks), seq 8192, GBS 2048
      (Blackwell issue: <= 2 s)

For each: wall time of the whole CLI (`meshplan plan ... --json`, process start included;
median and best of --repeat runs), its CPU time (median; robust when the machine is shared),
the search's own time, the valid layouts it evaluated, how many fit (the dominated ones
included), how many more it ruled out unevaluated because their weights and optimizer state
alone overflow the GPU (`search.state_fits`), how many recompute variants of layouts that fit
without recompute it skipped as dominated (`search._evaluate_dominating`), evaluated layouts
per second, and the winner's predicted step time (a speed-up must leave it unchanged).

Run: python benchmarks/plan_speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "a": ("gpt-530b", "dgx-a100", 641, 2048, 2520),
    "b": ("llama3.1-405b", "dgx-h100", 2048, 8192, 2048),
    "c": ("llama3.1-70b", "dgx-h100", 8, 8192, 128),
    "d": ("llama3.1-405b", "dgx-h100", 12500, 8192, 16384),
    "e": ("deepseek-v3", "dgx-h100", 2048, 4096, 8192),
    "f": ("llama3.1-405b", "gb200-nvl72", 4096, 8192, 2048),
}
TARGET_S = {"a": 2.0, "b": 1.0, "d": 2.0, "e": 2.0, "f": 2.0}
GPUS_PER_NODE = {"gb200-nvl72": 4}


def run_case(model: str, cluster: str, nodes: int, seq: int, gbs: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "planner.cli", "plan", "--model", model, "--cluster", cluster,
           "--nodes", str(nodes), "--seq-len", str(seq), "--global-batch-size", str(gbs), "--json"]
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {proc.stderr.strip()}")
    return wall, cpu, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="".join(CASES), help="which cases, e.g. 'bef'")
    args = ap.parse_args()
    print(f"{'case':<5} {'problem':<44} {'wall s':>7} {'best':>5} {'cpu s':>6} {'search s':>8} "
          f"{'evaluated':>9} {'fit':>9} {'pruned':>8} {'dominated':>9} {'eval/s':>8} {'step s':>7} "
          f"{'target':>6}"
          "  best layout")
    for key, (model, cluster, nodes, seq, gbs) in CASES.items():
        if key not in args.cases:
            continue
        runs = [run_case(model, cluster, nodes, seq, gbs) for _ in range(args.repeat)]
        wall = statistics.median(w for w, _, _ in runs)
        best = min(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        out = runs[-1][2]
        search = out["search"]
        plan = out["plans"][0]
        lay = plan["layout"]
        label = (f"tp{lay['tp']} pp{lay['pp']} cp{lay['cp']} dp{lay['dp']} vp{lay['vp']} "
                 + (f"ep{lay['ep']} etp{lay['etp']} " if lay["ep"] > 1 else "")
                 + f"mbs{lay['micro_batch_size']} {lay['recompute']} {lay['schedule']}")
        gpus = nodes * GPUS_PER_NODE.get(cluster, 8)
        target = TARGET_S.get(key)
        verdict = "-" if target is None else ("ok" if wall <= target else "SLOW")
        print(f"({key})  {model} on {gpus} {cluster} seq {seq} gbs {gbs:<6}"[:50].ljust(50)
              + f"{wall:>7.2f} {best:>5.2f} {cpu:>6.2f} {search['seconds']:>8.2f} "
              f"{search['candidates']:>9,} {search['feasible']:>9,} {search.get('pruned', 0):>8,} "
              f"{search.get('dominated', 0):>9,} "
              f"{search['candidates'] / search['seconds']:>8,.0f} "
              f"{plan['estimate']['step_time_s']:>7.4f} {verdict:>6}  {label}")
        if search["idle_nodes"]:
            print(f"      note: {len(search['idle_nodes'])} node(s) idle: no layout uses all "
                  f"{nodes} nodes with this batch")


if __name__ == "__main__":
    main()
