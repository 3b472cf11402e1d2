"""Launch files for a GB200 NVL72 plan: the rack as the SLURM block, the multi-node NVLink
settings, and MXFP8 in the Megatron-LM arguments.

The real-SLURM test (tests/test_slurm_real.py) cannot run this script: `--segment` arrived in
Slurm 24.05 (SchedMD/slurm 6b48b165, "Add documentation to '--segment='", in 24.05.0rc1) and
Debian 12's slurm-wlm is 22.05.8, whose sbatch stops with "unrecognized option
'--segment=18'"; and the one-node private cluster has no topology/block configuration, no
GPUs (the script asks for --gpus-per-node=4) and not 72 nodes, so sbatch would reject the
request anyway. What is checked here: bash parses the script, every #SBATCH line comes before
the first command (sbatch reads no directive after it), the segment obeys sbatch(1) (node
count a multiple of it), and the IMEX check really stops a node without a channel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher import slurm
from launcher.artifacts import render_launch
from launcher.megatron import megatron_args

sys.path.insert(0, str(Path(__file__).parent))
import launch_plans  # noqa: E402

OUT = Path("/shared/launch/nvl72")
FLAGS = {line.strip() for line in (Path(__file__).parent / "data" / "framework_args_megatron.txt")
         .read_text().splitlines() if line.startswith("--")}


def _sbatch(plan) -> str:
    return render_launch(plan, "/app/train.py", OUT, "slurm", "megatron")["launch.sbatch"]


def _header(text: str) -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first non-comment, non-blank line."""
    out = []
    for line in text.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            out.append(line)
    return out


@pytest.mark.parametrize("trays, segment", [(72, 18), (36, 18), (20, 10), (8, 8)])
def test_sbatch_asks_for_rack_segments(trays, segment):
    dims = {72: {}, 36: dict(tp=4, pp=6, cp=2, dp=3), 20: dict(tp=4, pp=5, cp=4, dp=1),
            8: dict(tp=4, pp=8, dp=1)}[trays]
    plan = launch_plans.nvl72(trays, **dims)
    text = _sbatch(plan)
    header = _header(text)
    assert f"#SBATCH --segment={segment}" in header and f"#SBATCH --nodes={trays}" in header
    assert trays % segment == 0  # sbatch(1): a node count above the segment is a multiple
    # the preset costs the job's racks as the segments it asks for (20 trays: 2 x 10)
    assert plan.cluster.nodes_per_domain == segment and "not a multiple of" not in text
    assert 'export NCCL_MNNVL_ENABLE="${NCCL_MNNVL_ENABLE:-1}"' in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_one_node_domains_get_no_segment():
    text = _sbatch(launch_plans.make("70b-vp"))
    assert "--segment" not in text and "MNNVL" not in text and "imex" not in text


def test_node_without_imex_channel_stops_with_one_line(tmp_path):
    """The node snippet's IMEX check, run as bash on this machine (no IMEX device here)."""
    if Path(slurm.IMEX_CHANNELS).exists():
        pytest.skip(f"{slurm.IMEX_CHANNELS} exists on this machine")
    check = "\n".join(["set -euo pipefail", *slurm.imex_check(), "echo reached-torchrun"])
    env = {"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "tray7"}
    off = subprocess.run(["bash", "-c", check], env=env, capture_output=True, text=True)
    assert off.returncode == 1 and off.stdout == ""
    assert off.stderr.count("\n") == 1 and "no IMEX channel on tray7" in off.stderr
    allowed = subprocess.run(["bash", "-c", check], env={**env, "NCCL_MNNVL_ENABLE": "0"},
                             capture_output=True, text=True)
    assert allowed.returncode == 0 and allowed.stdout == "reached-torchrun\n"
    assert "imex-channels" in _sbatch(launch_plans.nvl72())


def test_megatron_mxfp8_flags_are_real_and_say_mxfp8():
    args = megatron_args(launch_plans.nvl72())
    pairs = dict(zip(args, args[1:], strict=False))
    assert pairs["--fp8-format"] == "e4m3" and pairs["--fp8-recipe"] == "mxfp8"
    assert "--fp8-param-gather" in args and "--reuse-grad-buf-for-mxfp8-param-ag" in args
    assert {a for a in args if a.startswith("--")} <= FLAGS
    bf16 = megatron_args(launch_plans.nvl72(dtype="bf16"))
    assert not any(a.startswith("--fp8") for a in bf16)
