"""PyTorch-native parallelism for the example trainer: mesh, TP, FSDP2, pipeline, checkpoints.

- Device mesh: `init_device_mesh(device, dims.mesh_shape, dims.mesh_names)` with the layout's
  `ParallelDims` (slowest dimension first); the mesh is row-major, so its ranks follow meshplan's
  rank order exactly.
- Tensor parallel: DTensor `parallelize_module` with Megatron's split (Colwise wq/wk/wv/w1/w3,
  Rowwise wo/w2, vocab-sharded embedding and LM head); with sequence parallelism the norms use
  `SequenceParallel` and activations between blocks stay sharded along the sequence.
- Data parallel: FSDP2 `fully_shard` over the "dp" mesh dimension, per block and per chunk.
- Pipeline: `torch.distributed.pipelining.PipelineStage` per local chunk, `Schedule1F1B` (vp=1)
  or `ScheduleInterleaved1F1B` (vp>1); virtual stage k lives on pipeline rank k % pp.
- Checkpoints: `torch.distributed.checkpoint` with parameter names that carry global layer
  indices and flattened optimizer state, so DCP reshards a checkpoint onto any other layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from gpt_model import GPTChunk, lm_loss
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from cost_models.specs import Layout

STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
"""Flattened optimizer keys ("state.<param name>.exp_avg") are independent of how parameters
are grouped into optimizers, which lets pipeline layouts reshard (as torchtitan does)."""


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    """The layout's device mesh (`ParallelDims.mesh_shape` / `mesh_names`, slowest first,
    pp the first dimension); the process group must already be initialised."""
    dims = layout.dims
    return init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=dims.mesh_names)


def _block_plan(sequence_parallel: bool) -> dict:
    """Megatron-LM tensor-parallel split of one block (torchtitan's plan when SP is on)."""
    between = Shard(1) if sequence_parallel else Replicate()  # activations between blocks
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=between),
        "feed_forward.w3": ColwiseParallel(),
    }
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan |= {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                 "attention": gather, "feed_forward": gather}
    return plan


def apply_tensor_parallel(chunk: GPTChunk, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `chunk` over the tp mesh in place. Every rank built identical weights, so no
    broadcast is needed (src_data_rank=None: each rank slices its own copy)."""
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict = {}
    if hasattr(chunk, "tok_embeddings"):
        # Vocab-sharded (Shard(0)) like the LM head, so a tied head can reuse the DTensor.
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if chunk.is_last:
        plan["output"] = ColwiseParallel(input_layouts=between, output_layouts=Replicate())
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
    parallelize_module(chunk, tp_mesh, plan, src_data_rank=None)
    for block in chunk.layers.values():
        parts = {k: v for k, v in _block_plan(sequence_parallel).items()
                 if k != "feed_forward.w3" or hasattr(block.feed_forward, "w3")}
        parallelize_module(block, tp_mesh, parts, src_data_rank=None)
    chunk.tie_weights()  # parallelize_module replaced the head's Parameter; share it again


def apply_fsdp(chunk: GPTChunk, dp_mesh: DeviceMesh) -> None:
    """FSDP2 per block, then the chunk (embedding, norm, head).

    Parameters stay gathered from the first forward to the last backward of a step
    (reshard_after_forward=False plus `set_grad_sync`), and gradients are reduce-scattered
    once per step: one all-gather and one reduce-scatter per step with sharded optimizer state,
    the communication of Megatron-LM's distributed optimizer. The pipeline schedules do the same.
    """
    for block in chunk.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
    fully_shard(chunk, mesh=dp_mesh, reshard_after_forward=False)


def build_schedule(chunks: Sequence[GPTChunk], stage_ids: Sequence[int], num_stages: int,
                   num_microbatches: int, pp_group: dist.ProcessGroup, device: torch.device):
    """Pipeline stages for the local chunks and the schedule that runs them.

    The schedule averages gradients over micro-batches (scale_grads), so each stage's
    gradient is that of the mean micro-batch loss.
    """
    stages = [PipelineStage(c, k, num_stages, device, group=pp_group)
              for c, k in zip(chunks, stage_ids, strict=True)]
    if len(stages) == 1:
        return Schedule1F1B(stages[0], num_microbatches, loss_fn=lm_loss)
    return ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=lm_loss)


def set_grad_sync(chunk: GPTChunk, last_microbatch: bool) -> None:
    """Reduce-scatter gradients and reshard parameters only after the last micro-batch of a
    step (what PipelineStage does for FSDP modules under a schedule)."""
    if isinstance(chunk, FSDPModule):
        chunk.set_is_last_backward(last_microbatch)
        chunk.set_reshard_after_backward(last_microbatch)
        chunk.set_requires_gradient_sync(last_microbatch)


def embedding_groups(mesh: DeviceMesh, tied: bool) -> dist.ProcessGroup | None:
    """This rank's group {first stage, last stage} for a tied embedding split by the pipeline.

    Like Megatron-LM's embedding group: the first and last pipeline ranks of one (dp, cp, tp)
    coordinate each hold a copy of the tied matrix and sum their gradients before the step.
    Every rank must create every group (collective call), so all are built, one returned.
    """
    pp = mesh.size(0)
    if not tied or pp == 1:
        return None
    grid = mesh.mesh  # global ranks, pp first (`build_mesh`)
    mine = None
    for rest in grid[0].flatten().tolist():
        index = (grid[0] == rest).nonzero()[0].tolist()
        ranks = [rest, int(grid[pp - 1][tuple(index)])]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def sum_tied_grads(chunks: Sequence[GPTChunk], group: dist.ProcessGroup | None) -> None:
    """All-reduce (sum) the tied embedding gradient between the first and last stage."""
    if group is None:
        return
    for chunk in chunks:
        if not hasattr(chunk, "tok_embeddings"):
            continue
        param = chunk.tok_embeddings.weight
        grad = param.grad
        if isinstance(grad, DTensor):
            if grad.placements != param.placements:
                # The embedding backward may return a replicated gradient for a vocab-sharded
                # weight; the head's copy is sharded. Match the parameter so the shards align.
                grad = grad.redistribute(param.device_mesh, param.placements)
                param.grad = grad
            grad = grad.to_local()
        dist.all_reduce(grad, group=group)


def checkpoint_state(chunks: Sequence[GPTChunk], optimizers: Sequence[torch.optim.Optimizer],
                     step: int) -> tuple[dict, list[tuple[set, set]]]:
    """The DCP state {"model", "optim", "step"} of this rank, and each chunk's key sets.

    Getting the optimizer state initialises it (a zero-lr step) when it is still empty, so the
    same call prepares the tensors a checkpoint is loaded into.
    """
    model, optim, keys = {}, {}, []
    for chunk, opt in zip(chunks, optimizers, strict=True):
        msd, osd = get_state_dict(chunk, opt, options=STATE_OPTIONS)
        model.update(msd)
        optim.update(osd)
        keys.append((set(msd), set(osd)))
    return {"model": model, "optim": optim, "step": torch.tensor(step)}, keys


def save_state(state: dict, path: str) -> None:
    """Write `state` (from `checkpoint_state`) as a DCP checkpoint into directory `path`."""
    dcp.save(state, checkpoint_id=path)


def load_state(chunks: Sequence[GPTChunk], optimizers: Sequence[torch.optim.Optimizer],
               path: str) -> int:
    """Load the checkpoint at `path` (any layout) into the local chunks; returns its step."""
    state, keys = checkpoint_state(chunks, optimizers, 0)
    dcp.load(state, checkpoint_id=path)
    for chunk, opt, (mkeys, okeys) in zip(chunks, optimizers, keys, strict=True):
        set_state_dict(chunk, opt, options=STATE_OPTIONS,
                       model_state_dict={k: state["model"][k] for k in mkeys},
                       optim_state_dict={k: state["optim"][k] for k in okeys})
    return int(state["step"])
