"""``adamax-ps status --metrics host:port``: the Prometheus metrics, summed up for a person.

Reads the server's ``/metrics`` text (the same numbers a Prometheus server scrapes) and
reduces it to a few lines: pushes by outcome, rejections by reason, traffic, apply latency
quantiles (estimated from the histogram buckets, as ``histogram_quantile`` does), sync-round
waits and stragglers, gradient norms and clip rate, checkpoints.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def fetch_metrics(address: str, timeout: float = 5.0) -> str:
    url = address if "://" in address else f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - an operator-given URL
        return reply.read().decode("utf-8")


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """``histogram_quantile``: linear interpolation inside the bucket holding the q-th sample."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return None


def summarize(text: str) -> dict[str, Any]:
    """The at-a-glance numbers from a ``/metrics`` exposition."""
    sums: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    per_bucket: dict[tuple[str, float], float] = defaultdict(float)
    last_error = ""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name.endswith("_bucket"):
                per_bucket[(name[: -len("_bucket")], float(labels["le"]))] += value
                continue
            if name == "adamax_ps_checkpoint_last_error_info" and value:
                last_error = labels.get("error", "")
            key = tuple(labels.get(k, "") for k in ("optimizer", "outcome", "reason", "code", "method"))
            sums[name][key] += value
    for (name, bound), count in per_bucket.items():
        buckets[name].append((bound, count))

    def total(name: str) -> float:
        return sum(sums.get(name, {}).values())

    def by(name: str, index: int) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for key, value in sums.get(name, {}).items():
            out[key[index]] += value
        return dict(out)

    def mean(name: str) -> float | None:
        count = total(f"{name}_count")
        return total(f"{name}_sum") / count if count else None

    applies = by("adamax_ps_applies_total", 0)
    clipped = by("adamax_ps_clipped_applies_total", 0)
    return {
        "pushes": by("adamax_ps_pushes_total", 1),
        "rejected": by("adamax_ps_rejected_pushes_total", 2),
        "duplicates": total("adamax_ps_duplicate_pushes_total"),
        "late_pushes": total("adamax_ps_late_pushes_total"),
        "bytes_in": total("adamax_ps_received_bytes_total"),
        "bytes_out": total("adamax_ps_sent_bytes_total"),
        "iterations": by("adamax_ps_iterations", 0),
        "apply_seconds": {
            "mean": mean("adamax_ps_apply_seconds"),
            "p50": _quantile(buckets["adamax_ps_apply_seconds"], 0.5),
            "p99": _quantile(buckets["adamax_ps_apply_seconds"], 0.99),
        },
        "round_wait_seconds": {
            "mean": mean("adamax_ps_round_wait_seconds"),
            "p99": _quantile(buckets["adamax_ps_round_wait_seconds"], 0.99),
        },
        "stragglers": total("adamax_ps_stragglers_total"),
        "gradient_norm_mean": mean("adamax_ps_gradient_norm"),
        "clip_rate": {k: clipped.get(k, 0.0) / v for k, v in applies.items() if v},
        "checkpoints": total("adamax_ps_checkpoints_total"),
        "checkpoint_seconds_mean": mean("adamax_ps_checkpoint_seconds"),
        "checkpoint_bytes": total("adamax_ps_checkpoint_bytes"),
        "checkpoint_failures": total("adamax_ps_checkpoint_consecutive_failures"),
        "checkpoint_last_error": last_error,
    }


def metrics_summary(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """:func:`summarize` of a live endpoint; ``{"error": ...}`` when it cannot be read."""
    try:
        return summarize(fetch_metrics(address, timeout))
    except OSError as exc:
        return {"error": f"cannot read metrics from {address}: {exc}"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3g} ms"


def format_summary(summary: dict[str, Any]) -> str:
    if "error" in summary:
        return f"metrics: {summary['error']}"
    pushes = ", ".join(f"{k}={int(v)}" for k, v in sorted(summary["pushes"].items())) or "none"
    rejected = ", ".join(f"{k}={int(v)}" for k, v in sorted(summary["rejected"].items())) or "none"
    apply = summary["apply_seconds"]
    wait = summary["round_wait_seconds"]
    clip = ", ".join(f"{k}={v:.1%}" for k, v in sorted(summary["clip_rate"].items())) or "-"
    norm = summary["gradient_norm_mean"]
    lines = [
        "metrics:",
        f"  pushes: {pushes} (retries answered once: {int(summary['duplicates'])}, late: {int(summary['late_pushes'])})",
        f"  rejected pushes: {rejected}",
        f"  traffic: {summary['bytes_in'] / 2**20:.1f} MiB in, {summary['bytes_out'] / 2**20:.1f} MiB out",
        f"  apply latency: mean {_ms(apply['mean'])}, p50 {_ms(apply['p50'])}, p99 {_ms(apply['p99'])}",
        f"  sync rounds: mean wait {_ms(wait['mean'])}, p99 {_ms(wait['p99'])}, stragglers {int(summary['stragglers'])}",
        f"  gradient norm: mean {'-' if norm is None else f'{norm:.4g}'}; clip rate: {clip}",
        f"  checkpoints: {int(summary['checkpoints'])} written, mean {_ms(summary['checkpoint_seconds_mean'])}, "
        f"last {summary['checkpoint_bytes'] / 2**20:.1f} MiB",
    ]
    if summary.get("checkpoint_failures"):
        lines.append(
            f"  CHECKPOINTS FAILING: {int(summary['checkpoint_failures'])} in a row; last error: "
            f"{summary.get('checkpoint_last_error') or '-'}"
        )
    return "\n".join(lines)
