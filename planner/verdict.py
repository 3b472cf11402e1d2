"""The memory verdict `estimate` prints: fits with a margin, tight, or over with a remedy.

    v = memory_verdict(est, headroom=0.05, recompute_options={"selective": est_sel})
    v.line()   # "fits: 65.9 of 75.6 GiB usable (5% of memory kept free), 9.7 GiB to spare"

"Tight" means fitting by less than TIGHT_FRACTION of the usable memory: within the spread
that allocator behaviour and unmodelled buffers (CUDA graphs, TE userbuffers) add on real
runs, so a launch should expect to check its first steps' peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.specs import Estimate

TIGHT_FRACTION = 0.05
"""A fit with less than this fraction of usable memory to spare is reported as tight."""


@dataclass(frozen=True, slots=True)
class MemoryVerdict:
    """What the memory estimate says about launching the layout."""

    fits: bool
    peak_GiB: float
    """Predicted peak per GPU on the most loaded rank."""
    usable_GiB: float
    """Capacity less the headroom kept free."""
    headroom: float
    """Fraction of memory kept free (the same rule in plan and estimate)."""
    tight: bool
    """Fits by less than TIGHT_FRACTION of usable memory."""
    remedy: str | None
    """For a layout that does not fit (or is tight): the recompute setting that helps, and
    by how much."""

    @property
    def margin_GiB(self) -> float:
        """usable - peak: positive to spare, negative over."""
        return self.usable_GiB - self.peak_GiB

    def line(self) -> str:
        kept = f" ({100 * self.headroom:g}% of memory kept free)" if self.headroom else ""
        if self.fits:
            word = "tight" if self.tight else "fits"
            text = (f"{word}: {self.peak_GiB:.1f} of {self.usable_GiB:.1f} GiB usable{kept}, "
                    f"{self.margin_GiB:.1f} GiB to spare")
            if self.tight:
                text += f" (under {100 * TIGHT_FRACTION:g}%: within the estimate's error band)"
        else:
            text = (f"over by {-self.margin_GiB:.1f} GiB: {self.peak_GiB:.1f} GiB needed, "
                    f"{self.usable_GiB:.1f} GiB usable{kept}")
        return text + (f"; {self.remedy}" if self.remedy else "")

    def to_dict(self) -> dict:
        return {"fits": self.fits, "tight": self.tight, "peak_GiB": round(self.peak_GiB, 3),
                "usable_GiB": round(self.usable_GiB, 3), "margin_GiB": round(self.margin_GiB, 3),
                "headroom": self.headroom, "remedy": self.remedy}


def memory_verdict(est: Estimate, headroom: float,
                   recompute_options: dict[str, Estimate] | None = None) -> MemoryVerdict:
    """The verdict for `est`; `recompute_options` maps other recompute settings of the same
    layout to their estimates, from which a remedy is named when the fit is missing or tight:
    the lightest setting that fits, else the one that frees the most."""
    usable = est.capacity_GiB
    tight = est.fits and usable - est.peak_GiB < TIGHT_FRACTION * usable
    remedy = None
    if (not est.fits or tight) and recompute_options:
        freed = {k: est.peak_GiB - e.peak_GiB for k, e in recompute_options.items()
                 if e.peak_GiB < est.peak_GiB}
        fitting = [k for k in ("selective", "full") if k in freed and recompute_options[k].fits]
        pick = fitting[0] if fitting else max(freed, key=freed.get, default=None)
        if pick is not None:
            after = recompute_options[pick]
            slower = after.step_time_s / est.step_time_s - 1
            remedy = (f"--recompute {pick} frees {freed[pick]:.1f} GiB "
                      f"({'fits' if after.fits else 'still over'}, {100 * slower:+.1f}% step time)")
    return MemoryVerdict(est.fits, est.peak_GiB, usable, headroom, tight, remedy)
