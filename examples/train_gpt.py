"""Train a small GPT under any meshplan plan with PyTorch-native parallelism.

Usage:

    torchrun --nproc-per-node N [--nnodes ... --rdzv-endpoint ...] examples/train_gpt.py \\
        --plan plan.yaml [--steps 10] [--ckpt-dir DIR] [--ckpt-every K] \\
        [--log-file losses.jsonl] [--seed 0] [--lr 1e-3]

    python examples/train_gpt.py --plan plan.yaml --single-process [same options]

The first form runs the plan's layout: tensor parallel (DTensor), pipeline parallel
(torch.distributed.pipelining, 1F1B or interleaved 1F1B over the plan's layer ranges), data
parallel (FSDP2), sequence parallelism and activation recomputation as the plan says; N*nnodes
must equal the plan's world size. `--single-process` ignores the parallel layout and runs the
same model, data and micro-batches on one process with gradient accumulation: the reference the
parallel layouts must match (per-step losses within 1e-4 relative; ~1e-7 measured on CPU).

Each step trains on a synthetic global batch that depends only on (seed, step); the reported
loss is the mean next-token loss over the whole global batch. Rank 0 prints and appends
`{"step", "loss", "time_s"}` JSON lines to --log-file. With --ckpt-dir, a checkpoint of model,
optimizer and step is saved every --ckpt-every steps to DIR/step_<N> (N = steps done; written
to a temporary directory and renamed when complete) and the run resumes from the newest
complete one, whatever layout wrote it.

Fault injection (used by the `meshplan run` supervisor's tests), by global rank:
    MESHPLAN_FAULT_KILL="RANK:STEP"             the rank SIGKILLs itself when step STEP begins
    MESHPLAN_FAULT_HANG="RANK:STEP"             the rank sleeps forever when step STEP begins
    MESHPLAN_FAULT_SLOW="RANK:FACTOR[:FROM]"    the rank's steps take ~FACTOR x longer from
                                                step FROM (default 0) on
    MESHPLAN_FAULT_SLOW_CKPT="SECONDS[:STEP]"   the checkpoint save after STEP steps (every
                                                save without STEP) takes SECONDS longer
                                                (slow storage; the save is a section)
Context parallelism (cp > 1) and MoE models are not supported and are rejected up front.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# gpt_model and gpt_parallel are siblings: `python examples/train_gpt.py` puts this directory
# on sys.path.
import gpt_parallel as par
import torch
import torch.distributed as dist
from gpt_model import GPTChunk, build_chunk, lm_loss
from torch.distributed.checkpoint.api import CheckpointException

from cost_models.specs import Layout, ModelSpec, SpecError
from launcher.runtime import StepMonitor
from planner.planfile import Plan, read_plan

# ----------------------------------------------------------------------------------------------
# Options, faults, data
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True, help="plan.yaml written by `meshplan plan`")
    ap.add_argument("--steps", type=int, default=10, help="train until this many steps are done")
    ap.add_argument("--ckpt-dir", help="checkpoint directory (resume from its newest step_<N>)")
    ap.add_argument("--ckpt-every", type=int, default=0, help="save every K steps (0: never)")
    ap.add_argument("--log-file", help="append one JSON line per step (rank 0)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the weights and the data")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    ap.add_argument("--single-process", action="store_true",
                    help="ignore the parallel layout; same batches on one process (reference)")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.ckpt_every < 0 or args.lr <= 0:
        raise SpecError("--steps and --ckpt-every must be >= 0 and --lr > 0")
    if args.ckpt_every and not args.ckpt_dir:
        raise SpecError("--ckpt-every needs --ckpt-dir DIR to write the checkpoints to")
    return args


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected faults for this rank (None / 1.0 when not targeted)."""

    kill_step: int | None = None
    hang_step: int | None = None
    slow_factor: float = 1.0
    slow_from_step: int = 0


FAULT_FORMS = {
    "MESHPLAN_FAULT_KILL": ("RANK:STEP", (int,)),
    "MESHPLAN_FAULT_HANG": ("RANK:STEP", (int,)),
    "MESHPLAN_FAULT_SLOW": ("RANK:FACTOR[:FROM_STEP]", (float, int)),
}
"""Each fault variable's form and the types of the fields after RANK (trailing ones optional)."""


def _fault_fields(env: Mapping[str, str], name: str, rank: int) -> list | None:
    """The typed fields after RANK of fault variable `name` if it targets `rank`, else None."""
    value = env.get(name, "").strip()
    if not value:
        return None
    form, types = FAULT_FORMS[name]
    parts = value.split(":")
    try:
        if not 2 <= len(parts) <= len(types) + 1:
            raise ValueError(value)
        target = int(parts[0])
        fields = [kind(part) for kind, part in zip(types, parts[1:], strict=False)]
    except ValueError:
        raise SpecError(f"{name}={value!r} must look like {form}, e.g. 1:3") from None
    return fields if target == rank else None


def parse_faults(env: Mapping[str, str], rank: int) -> Faults:
    """Read MESHPLAN_FAULT_* for global rank `rank`; SpecError on a malformed value."""
    kill = _fault_fields(env, "MESHPLAN_FAULT_KILL", rank)
    hang = _fault_fields(env, "MESHPLAN_FAULT_HANG", rank)
    slow = _fault_fields(env, "MESHPLAN_FAULT_SLOW", rank) or [1.0]
    if slow[0] < 1.0:
        raise SpecError("MESHPLAN_FAULT_SLOW factor must be >= 1 (how many times slower)")
    return Faults(kill[0] if kill else None, hang[0] if hang else None, slow[0],
                  slow[1] if len(slow) == 2 else 0)


def fault_at_step_begin(faults: Faults, step: int) -> None:
    """Die (SIGKILL, exit status 137 under a shell) or hang forever if this step is targeted."""
    if faults.kill_step == step:
        print(f"[fault] rank {os.environ.get('RANK', '0')} killed at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.hang_step == step:
        print(f"[fault] rank {os.environ.get('RANK', '0')} hangs at step {step}", flush=True)
        while True:  # alive (heartbeats keep beating) but never reaches its next collective
            time.sleep(3600)


DATA_TOKENS = 64
"""Size of the sub-vocabulary the synthetic sequences use (all of it if the vocab is smaller)."""


def synthetic_batch(seed: int, step: int, layout: Layout, vocab_size: int) -> torch.Tensor:
    """The global batch of `step`: (gbs, seq_len + 1) token ids, a function of (seed, step).

    Every sequence walks a fixed random successor cycle over a sub-vocabulary of DATA_TOKENS
    ids (the cycle depends on the seed only) from a random start (depends on the step): the
    model first learns which ids occur, then the successor of each, so the loss falls from
    ln(vocab) towards 0.
    """
    tokens = min(DATA_TOKENS, vocab_size)
    cycle_gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab_size, generator=cycle_gen)[:tokens]  # the cycle, in order
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step + 1) % (1 << 63))
    gbs, length = layout.global_batch_size, layout.seq_len + 1
    start = torch.randint(0, tokens, (gbs, 1), generator=gen)
    return ids[(start + torch.arange(length)) % tokens]


def check_supported(plan: Plan, single_process: bool) -> None:
    """Reject what this trainer cannot run, saying what to change (one line)."""
    model, layout = plan.model, plan.layout
    if model.is_moe:
        raise SpecError(f"model {model.name} is a mixture of experts; examples/train_gpt.py "
                        "trains dense models only")
    if model.layer_pattern:
        raise SpecError(f"model {model.name} is a hybrid (Mamba) model; examples/train_gpt.py "
                        "trains transformers only")
    if single_process:
        return  # the layout is ignored
    if layout.cp > 1:
        raise SpecError(
            f"cp={layout.cp}: examples/train_gpt.py does not implement context parallelism "
            "(PyTorch's ring attention covers only the CUDA SDPA kernels); re-plan with cp=1"
        )
    if layout.pp > 1 and layout.vp == 1 and layout.num_microbatches < layout.pp:
        raise SpecError(
            f"1F1B needs at least pp={layout.pp} micro-batches per step, the plan has "
            f"{layout.num_microbatches}; raise global-batch-size or lower micro-batch-size"
        )


# ----------------------------------------------------------------------------------------------
# Setup: what this process trains
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """One process's share of the run and how it takes part in a step."""

    chunks: tuple[GPTChunk, ...]
    optimizers: tuple[torch.optim.Optimizer, ...]
    rank: int
    device: torch.device
    dp_rank: int
    dp: int
    num_microbatches: int
    """Micro-batches this process runs per step (gbs / (dp * mbs))."""
    schedule: object | None
    """The pipeline schedule when pp > 1, else None (plain gradient accumulation)."""
    holds_first: bool
    holds_last: bool
    loss_owner: bool
    """Adds its loss to the step's loss all-reduce (last stage, tp rank 0)."""
    emb_group: object | None
    """Process group summing a tied embedding's gradient across the pipeline, if any."""
    distributed: bool


def _optimizers(chunks: tuple[GPTChunk, ...], lr: float) -> tuple[torch.optim.Optimizer, ...]:
    """One AdamW per chunk (deterministic, element-wise: sharding does not change its math).
    foreach: one DTensor dispatch per op over all parameters instead of one per parameter."""
    return tuple(torch.optim.AdamW(c.parameters(), lr=lr, weight_decay=0.01, foreach=True)
                 for c in chunks)


def setup_single(plan: Plan, args: argparse.Namespace) -> Setup:
    """The whole model on one process; the plan's micro-batches run as gradient accumulation."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, layout = plan.model, plan.layout
    chunk = build_chunk(model, 0, model.num_layers, args.seed, layout.recompute).to(device)
    chunks = (chunk,)
    m = layout.global_batch_size // layout.micro_batch_size
    return Setup(chunks=chunks, optimizers=_optimizers(chunks, args.lr), rank=0, device=device,
                 dp_rank=0, dp=1, num_microbatches=m, schedule=None, holds_first=True,
                 holds_last=True, loss_owner=True, emb_group=None, distributed=False)


def _init_process_group(layout: Layout) -> tuple[int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world == 0:
        raise SpecError("not started by torchrun (WORLD_SIZE unset); launch with torchrun "
                        f"--nproc-per-node ... (world {layout.world}) or pass --single-process")
    if world != layout.world:
        raise SpecError(f"the plan needs {layout.world} processes (tp*pp*dp*cp) but torchrun "
                        f"started {world}; fix --nproc-per-node/--nnodes")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), torch.device("cpu")


def _build_local_chunks(plan: Plan, args: argparse.Namespace, mesh, pp_rank: int,
                        device: torch.device) -> tuple[tuple[GPTChunk, ...], tuple[int, ...]]:
    """This pipeline rank's chunks (virtual stages k with k % pp == pp_rank), parallelised."""
    layout = plan.layout
    stages = [s for s in plan.stages if s.pp_rank == pp_rank]
    chunks = []
    for s in stages:
        chunk = build_chunk(plan.model, s.first_layer, s.last_layer, args.seed,
                            layout.recompute).to(device)
        if layout.tp > 1:
            par.apply_tensor_parallel(chunk, mesh["tp"], layout.sequence_parallel)
        if layout.dp > 1:
            par.apply_fsdp(chunk, mesh["dp"])
        chunks.append(chunk)
    return tuple(chunks), tuple(s.index for s in stages)


def setup_distributed(plan: Plan, args: argparse.Namespace) -> Setup:
    """Process group, mesh, sharded chunks, optimizers and (pp > 1) the pipeline schedule."""
    layout = plan.layout
    rank, device = _init_process_group(layout)
    mesh = par.build_mesh(layout, device.type)
    coords = plan.coords(rank)
    chunks, stage_ids = _build_local_chunks(plan, args, mesh, coords.pp, device)
    num_stages = layout.pp * layout.vp
    schedule = None
    if layout.pp > 1:
        schedule = par.build_schedule(chunks, stage_ids, num_stages, layout.num_microbatches,
                                      mesh["pp"].get_group(), device)
    holds_last = num_stages - 1 in stage_ids
    return Setup(
        chunks=chunks, optimizers=_optimizers(chunks, args.lr), rank=rank, device=device,
        dp_rank=coords.dp, dp=layout.dp, num_microbatches=layout.num_microbatches,
        schedule=schedule, holds_first=0 in stage_ids, holds_last=holds_last,
        loss_owner=holds_last and coords.tp == 0 and coords.cp == 0,
        emb_group=par.embedding_groups(mesh, plan.model.tied_embeddings), distributed=True,
    )


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def local_batch(setup: Setup, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's contiguous slice of the global batch: (inputs, targets)."""
    rows = batch.shape[0] // setup.dp
    mine = batch[setup.dp_rank * rows:(setup.dp_rank + 1) * rows].to(setup.device)
    return mine[:, :-1], mine[:, 1:]


def forward_backward(setup: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradients of the mean micro-batch loss; returns that mean (0 where no loss is seen)."""
    m = setup.num_microbatches
    if setup.schedule is not None:
        losses: list[torch.Tensor] = []
        inputs = (x,) if setup.holds_first else ()
        target = y if setup.holds_last else None
        setup.schedule.step(*inputs, target=target, losses=losses)
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=setup.device)
        return total.detach() / m
    chunk, total = setup.chunks[0], torch.zeros((), device=setup.device)
    for i, (xm, ym) in enumerate(zip(x.chunk(m), y.chunk(m), strict=True)):
        par.set_grad_sync(chunk, i == m - 1)
        loss = lm_loss(chunk(xm), ym)
        (loss / m).backward()
        total += loss.detach()
    return total / m


def global_loss(setup: Setup, local_mean: torch.Tensor, mon: StepMonitor) -> float:
    """Mean token loss over the global batch: the dp ranks' means averaged, seen by all ranks."""
    if not setup.distributed:
        return float(local_mean)
    value = (local_mean / setup.dp if setup.loss_owner else torch.zeros_like(local_mean)).reshape(1)
    with mon.comm("loss_allreduce"):
        dist.all_reduce(value)
    return float(value)


def train_step(setup: Setup, batch: torch.Tensor, faults: Faults, step: int,
               mon: StepMonitor) -> float:
    """Forward, backward and optimizer step on one global batch; returns the step's loss."""
    t0 = time.perf_counter()
    x, y = local_batch(setup, batch)
    local_mean = forward_backward(setup, x, y)
    if setup.emb_group is not None:
        with mon.comm("embedding_grad_allreduce"):
            par.sum_tied_grads(setup.chunks, setup.emb_group)
    for opt in setup.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if faults.slow_factor > 1.0 and step >= faults.slow_from_step:
        time.sleep((faults.slow_factor - 1.0) * (time.perf_counter() - t0))
    return global_loss(setup, local_mean, mon)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CKPT_PREFIX = "step_"


def latest_checkpoint(ckpt_dir: str | None) -> tuple[int, Path] | None:
    """The newest complete checkpoint `step_<N>` (DCP's .metadata present), or None.

    Temporary `.tmp_step_<N>` directories of an interrupted save are never picked up.
    """
    if not ckpt_dir or not Path(ckpt_dir).is_dir():
        return None
    found = []
    for path in Path(ckpt_dir).iterdir():
        suffix = path.name[len(CKPT_PREFIX):]
        if path.name.startswith(CKPT_PREFIX) and suffix.isdigit() and (path / ".metadata").is_file():
            found.append((int(suffix), path))
    return max(found) if found else None


def _barrier(setup: Setup) -> None:
    if setup.distributed:
        dist.barrier()


def slow_checkpoint_s(env: Mapping[str, str], step: int) -> float:
    """Extra seconds MESHPLAN_FAULT_SLOW_CKPT="SECONDS[:STEP]" adds to the save at `step`
    (0 when unset or another step); SpecError when malformed."""
    value = env.get("MESHPLAN_FAULT_SLOW_CKPT", "").strip()
    if not value:
        return 0.0
    seconds_text, _, step_text = value.partition(":")
    try:
        seconds = float(seconds_text)
        at = int(step_text) if step_text else None
    except ValueError:
        seconds, at = -1.0, None
    if not 0.0 <= seconds < 3600.0:
        raise SpecError(f"MESHPLAN_FAULT_SLOW_CKPT={value!r} must look like SECONDS[:STEP], "
                        "seconds in [0, 3600)")
    return seconds if at is None or at == step else 0.0


def save_checkpoint(setup: Setup, ckpt_dir: str, step: int, mon: StepMonitor) -> Path:
    """Save model, optimizer and step to ckpt_dir/step_<step> via a temporary directory.

    DCP writes every rank's shards and then the .metadata file into `.tmp_step_<N>`; only after
    all ranks are done does rank 0 rename it, so a crash mid-save leaves no `step_<N>`. The
    directory must be on a file system all nodes share.
    """
    final = Path(ckpt_dir) / f"{CKPT_PREFIX}{step}"
    tmp = Path(ckpt_dir) / f".tmp_{CKPT_PREFIX}{step}"
    # a section: a long save is a legitimate pause, not a hang (the detector allows for it)
    with mon.section("checkpoint"), mon.comm("checkpoint"):
        if setup.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            time.sleep(slow_checkpoint_s(os.environ, step))
        _barrier(setup)
        state, _ = par.checkpoint_state(setup.chunks, setup.optimizers, step)
        par.save_state(state, str(tmp))
        _barrier(setup)
        if setup.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        _barrier(setup)
    return final


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------


def _log(setup: Setup, log_file: str | None, record: dict) -> None:
    if setup.rank != 0:
        return
    line = json.dumps(record)
    print(line, flush=True)
    if log_file:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def train(args: argparse.Namespace) -> None:
    """Run (or resume) training to `args.steps` steps under the plan."""
    plan = read_plan(args.plan)
    check_supported(plan, args.single_process)
    faults = parse_faults(os.environ, 0 if args.single_process else int(os.environ.get("RANK", 0)))
    if args.single_process:  # DCP warns that it runs without a process group: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    setup = setup_single(plan, args) if args.single_process else setup_distributed(plan, args)
    mon = StepMonitor.from_env()
    start = 0
    resume = latest_checkpoint(args.ckpt_dir)
    if resume is not None:
        start = _resume(setup, resume[1])
        _log(setup, None, {"resumed_from": str(resume[1]), "start_step": start})
    try:
        run_steps(setup, plan.model, plan.layout, args, faults, mon, start)
    finally:
        mon.close()


def _resume(setup: Setup, path: Path) -> int:
    """Load checkpoint `path` (written under any layout); returns the step to continue from."""
    try:
        return par.load_state(setup.chunks, setup.optimizers, str(path))
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        # DCP wraps the cause (missing key, other shape) in a multi-rank report whose last
        # line names it.
        lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise SpecError(f"cannot resume from {path} ({lines[-1].strip()[:200]}); was it written "
                        "for another model? Use a fresh --ckpt-dir") from None


def run_steps(setup: Setup, model: ModelSpec, layout: Layout, args: argparse.Namespace,
              faults: Faults, mon: StepMonitor, start: int) -> None:
    """Steps start..args.steps-1: faults, monitor records, log lines, periodic checkpoints."""
    for step in range(start, args.steps):
        fault_at_step_begin(faults, step)
        mon.step_begin(step)
        t0 = time.perf_counter()
        batch = synthetic_batch(args.seed, step, layout, model.vocab_size)
        loss = train_step(setup, batch, faults, step, mon)
        mon.step_end(step, loss)
        _log(setup, args.log_file, {"step": step, "loss": loss,
                                    "time_s": round(time.perf_counter() - t0, 6)})
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            save_checkpoint(setup, args.ckpt_dir, step + 1, mon)


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
        if dist.is_initialized():  # every rank done before any tears gloo down (a rank that
            dist.barrier()         # exits mid-teardown of a peer can abort in std::terminate)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
