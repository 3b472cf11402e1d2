"""Pipeline schedules: which ones exist, their rules, bubble and in-flight activation memory.

Every formula is vectorised over a grid's columns (numpy arrays of schedule codes, pp, vp, m)
and is checked against the event simulator (`cost_models.simulator`), which plays each
schedule operation by operation (tests/test_schedules.py).

Notation (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", ICLR 2024, Sec. 2): per micro-
batch and pipeline rank, F is the forward, B the backward for the inputs (activation
gradients, recompute included) and W the backward for the weights; tau = F + B + W is what
1F1B runs as one backward. With p ranks and equal ranks:

  schedule     placement              bubble                                  in-flight (rank units)
  1f1b         stage k on rank k      (p-1)·tau                               min(m, p-r)
  interleaved  k on k mod p, v chunks (p-1)·tau / v                           Megatron-LM warm-up
  zb-h1        as 1f1b, W deferred    (p-1)·(F+B-W)                           min(m, p-r)
  zb-v         V: 2 chunks            (p-1)·max(B, W, 2(B-W), 2F-B)/2         min(m, p)
                                      or (p-m)F + (p-1)B, the larger
  dualpipe     both directions        (p/2-1)·max(F+2B-W, 2F)                 min(m, p+1)
  dualpipev    V: 2 chunks            (p-1)·max(F+2B-W, 2F)/2                 min(m, p+1/2)

- 1F1B: Narayanan et al. 2021 (SC'21) Sec. 2.2; interleaved: ibid. Sec. 2.2.2 (bubble / v).
  That assumes equal chunks; with uneven ones Megatron's fixed order also stalls in its
  steady phase, which `cost_models.megatron.interleaved_stall_s` adds on top
  (`simulator.interleaved_stall_layers`).
- ZB-H1: Qi et al. 2024 Sec. 3.1 and Table 3 (memory p·M_B, bubble (p-1)(T_F+T_B-T_W)).
- ZB-V: Qi et al. 2024 Sec. 6 (V-shape placement, two chunks per rank, 1F1B's memory
  p·M_B), in the order torchtitan runs: PyTorch's ZBVZeroBubble (torch 2.13,
  cost_models.pipeline_orders). Its fill, simulated on equal stages, is
  (p-1)·max(B, W, 2(B-W), 2F-B)/2, exactly for transformer-like ratios (B >= F) and m >=
  2p-1; with fewer micro-batches the F+B chain (p-m)F + (p-1)B binds, exactly;
  a critical rank holding both ends absorbs m times its surplus (`end_absorption`). (The
  paper-style (p-1)(F+B-W)/2 priced before is higher wherever F > W; the paper's
  (p-1)(F+B-2W)/2 also overlaps the next step's warm-up with this step's drain, optimizer
  post-validation, Sec. 4, which a step ended by a synchronous optimizer cannot.)
- DualPipe / DualPipeV: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" Sec. 3.2.1 and
  Table 2 (activations PP+1 chunks, parameters 2x for DualPipe, and PP/2-1 fill steps since
  micro-batches enter from both ends); DualPipeV ("cut-in-half", the DualPipe repository) is
  DualPipe folded onto p ranks of two chunks each, PP = 2p chunk stages of half a rank. The
  repository README's per-step cost F&B + B - 3W, with B the full backward (B + W in this
  notation) and F&B = F + B + W without overlap, is F + 2B - W; DeepSeek's order
  (cost_models.pipeline_orders, simulated) fills at that, or at 2F where F + W > 2B (the
  turn then waits on two forwards), within half a step (tests/test_pipeline_orders.py),
  each step less what its F&B pair hides (`bubble_factor`'s pair_frac). The steady pairs'
  gain, each micro-batch's all-to-all hidden under the other's compute, is not a bubble
  term: `overlapped_pairs` (and cost_models.megatron.fb_hidden) take it off the EP
  communication.

The bubbles are written as factors of (sum_r tau_r - max_r tau_r), which is (p-1)·tau for
equal ranks and keeps uneven splits meaningful. F+B-W is taken as F + max(B-W, 0) (a W
longer than B has no more B-wait to fill; see `bubble_factor`).
"""

from __future__ import annotations

import numpy as np

from .errors import SpecError

SCHEDULES: tuple[str, ...] = ("1f1b", "interleaved", "zb-h1", "zb-v", "dualpipe", "dualpipev")
"""Every modelled schedule; a layout's `schedule` is one of them (codes are the indices)."""
V_SHAPE: tuple[str, ...] = ("zb-v", "dualpipev")
"""Schedules that place two chunks per rank in a V: stage k on rank k, stage 2p-1-k on rank k."""
ZERO_BUBBLE: tuple[str, ...] = ("zb-h1", "zb-v", "dualpipe", "dualpipev")
"""Schedules that split the backward into B (inputs) and W (weights) and defer W."""
CHUNKS: dict[str, int | None] = {"1f1b": 1, "interleaved": None, "zb-h1": 1, "zb-v": 2,
                                 "dualpipe": 1, "dualpipev": 2}
"""vp each schedule needs (None: any vp > 1)."""
CODE = {name: i for i, name in enumerate(SCHEDULES)}


def default_schedule(vp: int) -> str:
    """The schedule a layout without one runs: Megatron-LM's (interleaved when vp > 1)."""
    return "interleaved" if vp > 1 else "1f1b"


def schedule_problem(schedule: str, pp: int, vp: int, num_microbatches: int) -> str | None:
    """Why `schedule` cannot run with these degrees (one actionable sentence), or None."""
    if schedule not in SCHEDULES:
        return f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}"
    if schedule != "1f1b" and pp == 1:
        return f"the {schedule} schedule needs pp > 1; use schedule 1f1b or raise --pp"
    need = CHUNKS[schedule]
    if need is None and vp == 1:
        return "the interleaved schedule needs vp > 1; raise --vp or use schedule 1f1b"
    if need is not None and vp != need:
        return (f"the {schedule} schedule runs {need} model chunk(s) per pipeline rank, so it "
                f"needs vp={need} (got vp={vp}); set --vp {need} or choose another schedule")
    if schedule == "interleaved" and num_microbatches % pp:
        return (f"the interleaved schedule needs the micro-batch count ({num_microbatches}) "
                f"to be a multiple of pp = {pp} (Megatron-LM); change gbs or mbs")
    if schedule == "dualpipe" and (pp % 2 or num_microbatches % 2):
        return (f"the dualpipe schedule feeds half the micro-batches from each end, so pp "
                f"({pp}) and the micro-batch count ({num_microbatches}) must be even")
    if schedule in ("dualpipe", "dualpipev") and num_microbatches < 2 * pp:
        return (f"the {schedule} schedule needs at least 2*pp = {2 * pp} micro-batches "
                f"(DeepSeek DualPipe), got {num_microbatches}; lower mbs or dp, or raise gbs")
    return None


def valid_mask(code, pp, vp, m):
    """Vectorised `schedule_problem(...) is None` over grid columns."""
    c = np.asarray(code)
    ok = np.ones(np.broadcast(c, pp, vp, m).shape, dtype=bool)
    ok &= (c == CODE["1f1b"]) | (pp > 1)
    ok &= np.where(c == CODE["interleaved"], (vp > 1) & (m % np.maximum(pp, 1) == 0), True)
    ok &= np.where(np.isin(c, [CODE["1f1b"], CODE["zb-h1"], CODE["dualpipe"]]), vp == 1, True)
    ok &= np.where(np.isin(c, [CODE["zb-v"], CODE["dualpipev"]]), vp == 2, True)
    ok &= np.where(c == CODE["dualpipe"], (pp % 2 == 0) & (m % 2 == 0), True)
    ok &= np.where(np.isin(c, [CODE["dualpipe"], CODE["dualpipev"]]), m >= 2 * pp, True)
    return ok


def is_v_shape(code):
    return np.isin(np.asarray(code), [CODE[s] for s in V_SHAPE])


def is_mirrored(code):
    """DualPipe: rank r holds stage r of one direction and stage p-1-r of the other, each
    for half the micro-batches."""
    return np.asarray(code) == CODE["dualpipe"]


def bubble_factor(code, pp, vp, w_frac, b_frac, num_microbatches=None, pair_frac=0.0):
    """Bubble as a multiple of (sum_r tau_r - max_r tau_r) (= (p-1)·tau for equal ranks);
    `num_microbatches` m (given by the cost model): ZB-V's fill when m < 2p-1, the F+B
    chain (p-m)F + (p-1)B; `pair_frac`: the share of tau one DualPipe(V) F&B pair hides
    (`megatron.fb_hidden`), taken off each fill step's F&B.

    w_frac, b_frac: the W and B shares of tau. Formulas and sources in the module docstring;
    the zero-bubble step F+B-W (Qi et al. 2024 Table 3) is F + max(B-W, 0): a W larger than
    B cannot fill more than the B-wait of the fill, and the simulator's ZB-H1 then gives
    (p-1)·F. With W <= B (every transformer layer: B holds the input-gradient GEMMs plus the
    attention backward) it is tau - 2W. DualPipe(V)'s step is max(F + 2B - W, 2F) less
    the fill step's pair saving; what the steady F&B pairs hide is not a bubble term
    (`overlapped_pairs`).
    """
    c = np.asarray(code)
    p = np.maximum(pp, 2)
    f_frac = 1.0 - np.asarray(b_frac) - w_frac
    zb = f_frac + np.maximum(np.asarray(b_frac) - w_frac, 0.0)
    b = np.asarray(b_frac)
    # DualPipe(V) fill step, DeepSeek's F&B + B_full - 3W with F&B = F + B_full less what the
    # pair hides: F + 2B - W, or 2F where the turn waits on two forwards (F + W > 2B), each
    # step less one pair's hidden communication (DeepSeek's order, simulated)
    dual = np.maximum(2 * f_frac, f_frac + 2 * b - w_frac) - pair_frac
    # ZB-V in PyTorch's ZBVZeroBubble order (simulated): max(B, W, 2(B-W), 2F-B)/2 per step;
    # with m < 2p-1 micro-batches the F+B chain binds: (p-m)F + (p-1)B in all
    zbv = np.maximum(np.maximum(b, w_frac), np.maximum(2 * (b - w_frac), 2 * f_frac - b)) / 2
    if num_microbatches is not None:
        zbv = np.maximum(zbv, b + (p - num_microbatches) / (p - 1) * f_frac)
    out = np.select(
        [c == CODE["1f1b"], c == CODE["interleaved"], c == CODE["zb-h1"], c == CODE["zb-v"],
         c == CODE["dualpipe"], c == CODE["dualpipev"]],
        [np.ones_like(w_frac), 1.0 / np.maximum(vp, 1), zb, zbv,
         (p / 2 - 1) / (p - 1) * dual, dual / 2])
    return np.maximum(out, 0.0)


def end_absorption(code, pp, num_microbatches):
    """Micro-batches' worth of its surplus (its extra work per micro-batch over the busiest
    other rank) by which a critical rank holding both ends shortens its own wait in the
    fixed V and DualPipe orders (simulated; `megatron._end_rank_surplus`): all m in
    PyTorch's ZB-V order (the step is then bounded by the other ranks' work plus their
    fill), 2(p-1) in DeepSeek's DualPipe(V) order, whose F&B pairs tie the ranks together;
    0 for the looped schedules."""
    c = np.asarray(code)
    dual = np.isin(c, [CODE["dualpipe"], CODE["dualpipev"]])
    return np.where(c == CODE["zb-v"], num_microbatches, np.where(dual, 2 * (pp - 1), 0))


def end_fill_floor(code, pp, w_frac, b_frac):
    """The V and DualPipe bubble when the critical ranks holding both ends are heavy enough
    to fill the rest: the wait the fixed orders leave on them, returned as a multiple of
    (sum_r tau_r - max_r tau_r) like `bubble_factor` (the seconds below divided by (p-1)·tau
    for equal ranks); 0 for the looped schedules. DualPipe(V) (DeepSeek's order): max(B-W, 0)
    per fill step, (p-1)·max(B-W, 0)/2 for DualPipeV's half steps, (p/2-1)·max(B-W, 0) for
    DualPipe; ZB-V (PyTorch's order): ((p-1)·max(B-W, W) - W)/2. Measured in the simulated
    orders (tests/test_pipeline_orders.py)."""
    c = np.asarray(code)
    p = np.maximum(pp, 2)
    step = np.maximum(np.asarray(b_frac) - w_frac, 0.0)
    zbv = (np.maximum(step, w_frac) - w_frac / (p - 1)) / 2
    return np.select([c == CODE["dualpipe"], c == CODE["dualpipev"], c == CODE["zb-v"]],
                     [(p / 2 - 1) / (p - 1) * step, step / 2, np.maximum(zbv, 0.0)], 0.0)


def inflight_microbatches(code, pp, vp, num_microbatches, pp_rank=0):
    """Micro-batches (in units of a whole rank's layers) whose activations a rank holds at
    its peak. 1F1B and ZB-H1: min(m, p - r) (Qi et al. 2024 Table 3: ZB-H1 keeps 1F1B's
    p·M_B); interleaved: Megatron-LM's warm-up (Korthikanti et al. 2022 Sec. 4.2.3); ZB-V:
    2p half-rank chunks on every rank, p·M_B (Qi et al. 2024 Sec. 6; PyTorch's
    ZBVZeroBubble order peaks there); DualPipeV: PP+1 = 2p+1 half-rank chunks, DualPipe: PP+1
    chunks of a rank's layers (DeepSeek-V3 Table 2; DeepSeek's order peaks at both). The
    peaks are counted in `cost_models.pipeline_orders` (tests/test_pipeline_orders.py)."""
    c = np.asarray(code)
    m = num_microbatches
    one_f_one_b = np.minimum(m, pp - pp_rank)
    chunks = np.minimum(m * vp, 2 * (pp - pp_rank - 1) + (vp - 1) * pp + 1)
    return np.select(
        [c == CODE["interleaved"], c == CODE["zb-v"], c == CODE["dualpipe"],
         c == CODE["dualpipev"]],
        [chunks / np.maximum(vp, 1), np.minimum(m, pp), np.minimum(m, pp + 1),
         np.minimum(m, pp + 0.5)],
        one_f_one_b).astype(float)


def holds_ends(code, pp, pp_rank):
    """(embedding, LM head) masks: whether pipeline rank `pp_rank` holds stage 0 and the last
    stage's head. Looped placement: ranks 0 and pp-1; the V schedules: both on rank 0;
    DualPipe: both on each end rank (stage 0 of one direction, stage pp-1 of the other)."""
    c, r = np.asarray(code), np.asarray(pp_rank)
    mirror = is_mirrored(c)
    first, final = r == 0, r == pp - 1
    return first | (mirror & final), np.where(is_v_shape(c), first, final) | (mirror & first)


def weight_copies(code):
    """Copies of the rank's parameters (and gradients) a schedule keeps: 2 for DualPipe,
    whose ranks hold a stage of each direction (DeepSeek-V3 Table 2), else 1."""
    return np.where(is_mirrored(code), 2, 1)


def overlapped_pairs(code, pp, num_microbatches):
    """Share of the micro-batches whose forward runs paired with another's backward (F&B)
    under DualPipe/DualPipeV: all but the p warm-up and p cool-down ones of the steady phase
    (DeepSeek-V3 Fig. 5); 0 for the other schedules."""
    c = np.asarray(code)
    dual = np.isin(c, [CODE["dualpipe"], CODE["dualpipev"]])
    share = np.maximum(num_microbatches - pp, 0) / np.maximum(num_microbatches, 1)
    return np.where(dual, share, 0.0)


def codes(names) -> np.ndarray:
    """Schedule names -> codes; SpecError for an unknown one."""
    out = []
    for name in names:
        if name not in CODE:
            raise SpecError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")
        out.append(CODE[name])
    return np.array(out, dtype=np.int64)
