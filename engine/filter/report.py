"""What a filter run reports: running totals, a score histogram, report.json and scores.png.

``FilterTally`` is the run's state: counts, token totals, elapsed time and two score histograms
(kept and flagged rows). It is plain JSON, so it is stored in the checkpoint after every window
and summed across shards by ``refteacher merge``. The histograms have 16384 bins over [-1, 1]
(cosine scores), so memory stays fixed however large the dataset; quantiles are read from them
by linear interpolation inside a bin (accurate to the bin width, 1.2e-4) and clipped to the
exact minimum and maximum.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

HIST_BINS = 16384
HIST_LOW, HIST_HIGH = -1.0, 1.0
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
REPORT_FORMAT = "refteacher.filter-report/1"


def now_iso() -> str:
    """Return the current UTC time as an ISO-8601 string with seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def score_bin(score: float) -> int:
    """Return the histogram bin (0..HIST_BINS-1) of a score; scores outside [-1, 1] go to the end bins."""
    position = (score - HIST_LOW) / (HIST_HIGH - HIST_LOW) * HIST_BINS
    return min(HIST_BINS - 1, max(0, int(math.floor(position))))


def reason_kind(reason: str) -> str:
    """Return a short category of a rejection reason (details and numbers dropped) for counting."""
    kind = reason.split(" (")[0].split(": ")[0]
    return re.sub(r"(?<![\w-])\d+", "N", kind)[:80]


@dataclass
class FilterTally:
    """Running totals of a filter run (JSON-able; see module doc). ``next_window`` is the resume point."""

    next_window: int = 0
    rows: int = 0
    kept: int = 0
    flagged: int = 0
    rejected: int = 0
    truncated: int = 0
    prompts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    runs: int = 0
    started: str = ""
    finished: str | None = None
    score_min: float | None = None
    score_max: float | None = None
    score_sum: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    hist_kept: dict[str, int] = field(default_factory=dict)
    hist_flagged: dict[str, int] = field(default_factory=dict)
    flagged_categories: dict[str, int] = field(default_factory=dict)

    def add_row(self, status: str, score: float | None = None, reason: str | None = None,
                truncated: bool = False, category: str | None = None) -> None:
        """Count one row with its verdict (``kept`` / ``flagged`` / ``rejected``) and, for a flagged
        row, its hazard category."""
        self.rows += 1
        setattr(self, status, getattr(self, status) + 1)
        self.truncated += bool(truncated)
        if status == "rejected":
            kind = reason_kind(reason or "unknown")
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
            return
        if category is not None:
            self.flagged_categories[category] = self.flagged_categories.get(category, 0) + 1
        hist = self.hist_kept if status == "kept" else self.hist_flagged
        key = str(score_bin(score))
        hist[key] = hist.get(key, 0) + 1
        self.score_min = score if self.score_min is None else min(self.score_min, score)
        self.score_max = score if self.score_max is None else max(self.score_max, score)
        self.score_sum += score

    def to_json(self) -> dict[str, Any]:
        """Return the tally as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FilterTally":
        """Rebuild a tally from ``to_json`` output (one written before a field existed takes its default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def combine(cls, tallies: Iterable["FilterTally"]) -> "FilterTally":
        """Return the sum of several shards' tallies (times: earliest start, latest finish, max seconds)."""
        total = cls()
        tallies = list(tallies)
        for t in tallies:
            for name in ("rows", "kept", "flagged", "rejected", "truncated", "prompts", "tokens", "padded_tokens", "runs"):
                setattr(total, name, getattr(total, name) + getattr(t, name))
            total.score_sum += t.score_sum
            for mine, theirs in ((total.reasons, t.reasons), (total.hist_kept, t.hist_kept),
                                 (total.hist_flagged, t.hist_flagged),
                                 (total.flagged_categories, t.flagged_categories)):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            for name, pick in (("score_min", min), ("score_max", max)):
                values = [v for v in (getattr(total, name), getattr(t, name)) if v is not None]
                setattr(total, name, pick(values) if values else None)
        total.started = min((t.started for t in tallies if t.started), default="")
        finished = [t.finished for t in tallies if t.finished]
        total.finished = max(finished) if finished else None
        # shards run side by side: the slowest one is the wall time of the whole
        total.seconds = max((t.seconds for t in tallies), default=0.0)
        return total

    def scored(self) -> int:
        """Return the number of rows with a score (kept + flagged)."""
        return self.kept + self.flagged

    def quantiles(self) -> dict[str, float]:
        """Return score quantiles (keys like ``"0.5"``) of kept and flagged rows, from the histograms."""
        counts = [0] * HIST_BINS
        for hist in (self.hist_kept, self.hist_flagged):
            for key, count in hist.items():
                counts[int(key)] += count
        total = sum(counts)
        if total == 0:
            return {}
        width = (HIST_HIGH - HIST_LOW) / HIST_BINS
        out = {}
        for q in QUANTILES:
            target = q * total
            cumulative = 0
            for index, count in enumerate(counts):
                if count and cumulative + count >= target:
                    value = HIST_LOW + (index + (target - cumulative) / count) * width
                    out[str(q)] = round(min(self.score_max, max(self.score_min, value)), 6)
                    break
                cumulative += count
        return out


def build_report(tally: FilterTally, *, threshold: float, threshold_source: str, teacher: dict[str, Any],
                 input_info: dict[str, Any], settings: dict[str, Any], shard: str) -> dict[str, Any]:
    """Return the report.json payload of a finished run (or merge) from its tally."""
    seconds = tally.seconds or float("nan")
    scored = tally.scored()
    return {
        "format": REPORT_FORMAT,
        "input": input_info,
        "teacher": teacher,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "rule": "flagged when score >= threshold; score = cosine(hidden state at the last prompt token at the "
                "teacher's layer, refusal feature); chat rows: the maximum over their user turns",
        "shard": shard,
        "counts": {
            "input_rows": tally.rows,
            "kept": tally.kept,
            "flagged": tally.flagged,
            "rejected": tally.rejected,
            "truncated": tally.truncated,
            "prompts_scored": tally.prompts,
        },
        "flagged_fraction": round(tally.flagged / scored, 6) if scored else None,
        "flagged_by_category": dict(sorted(tally.flagged_categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        "rejected_reasons": dict(sorted(tally.reasons.items())),
        "scores": {
            "count": scored,
            "min": tally.score_min,
            "max": tally.score_max,
            "mean": round(tally.score_sum / scored, 6) if scored else None,
            "quantiles": tally.quantiles(),
        },
        "throughput": {
            "seconds": round(tally.seconds, 3),
            "rows_per_s": round(tally.rows / seconds, 3) if tally.seconds else None,
            "tokens_per_s": round(tally.tokens / seconds, 1) if tally.seconds else None,
            "tokens": tally.tokens,
            "padded_tokens": tally.padded_tokens,
            "runs": tally.runs,
        },
        "settings": settings,
        "started": tally.started,
        "finished": tally.finished,
    }


def plot_scores(tally: FilterTally, threshold: float, path: str | Path, *, bars: int = 100) -> Path | None:
    """Draw the kept / flagged score histogram with the threshold line to ``path`` (PNG); None if no scores."""
    if tally.scored() == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = max(HIST_LOW, tally.score_min - 1e-6)
    high = min(HIST_HIGH, tally.score_max + 1e-6)
    if high - low < 1e-3:
        low, high = low - 5e-4, high + 5e-4
    width = (HIST_HIGH - HIST_LOW) / HIST_BINS
    edges = [low + (high - low) * i / bars for i in range(bars + 1)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for hist, label, color in ((tally.hist_kept, "kept", "tab:blue"), (tally.hist_flagged, "flagged", "tab:red")):
        heights = [0] * bars
        for key, count in hist.items():
            centre = HIST_LOW + (int(key) + 0.5) * width
            slot = min(bars - 1, max(0, int((centre - low) / (high - low) * bars)))
            heights[slot] += count
        ax.bar(edges[:-1], heights, width=(high - low) / bars, align="edge", alpha=0.7, color=color,
               label=f"{label} ({sum(hist.values())})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("refusal score (cosine with the teacher's feature)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
