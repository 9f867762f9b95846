"""Registration settings compared on the same stored cases.

Every case is registered with each variant in turn, in one process, one registration at a
time: a machine whose speed drifts between hours (10-25% measured on the 2-core machine of
docs/benchmarks.md) then slows every variant alike. The per-case ratio of ``time_s`` to the
first variant's is the measure of a change; each variant's records are also summarised as
``evaluate`` does (success, gate counts, mTRE), and the cases whose outcome (status or
success) differs from the first variant's are named.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import time
from typing import Sequence

from guidance.core.volume import Volume
from guidance.evaluation.benchmark import BenchmarkCase, quantile, summarize
from guidance.evaluation.metrics import EvaluationError
from guidance.evaluation.runners import error_record, progress_line, score_case
from guidance.registration.register import RegistrationSettings, Registrator

__all__ = ["settings_from_text", "compare_settings", "format_comparison"]


def settings_from_text(text: str) -> RegistrationSettings:
    """``RegistrationSettings`` with the fields named in ``text`` changed: "name=value;..."
    with Python literals as values ("" gives the defaults), e.g.
    "coarse_soft_binning=1.0;pyramid=(4, 2, 1)"."""
    defaults = RegistrationSettings()
    names = {f.name for f in dataclasses.fields(RegistrationSettings)}
    changes = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in names:
            raise EvaluationError(f"{item!r} is not 'setting=value' of a registration setting; "
                                  f"the settings: {', '.join(sorted(names))}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise EvaluationError(f"setting {name}: {value!r} is not a Python literal") from None
        default = getattr(defaults, name)
        if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if default is not None and parsed is not None and type(parsed) is not type(default):
            raise EvaluationError(f"setting {name}: {value!r} is of type {type(parsed).__name__}, the setting "
                                  f"of type {type(default).__name__} (default {default!r})")
        changes[name] = parsed
    return dataclasses.replace(defaults, **changes)


def _changed_settings(settings: RegistrationSettings) -> dict:
    """The fields of ``settings`` that differ from the defaults (nested limits as dicts)."""
    defaults = RegistrationSettings()
    changed = {}
    for f in dataclasses.fields(RegistrationSettings):
        value = getattr(settings, f.name)
        if value != getattr(defaults, f.name):
            changed[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return changed


def _score(registrator: Registrator, case: BenchmarkCase) -> dict:
    try:
        return score_case(registrator, case)
    except Exception as error:  # a failing case is reported, the comparison goes on
        return error_record(case, error)


def compare_settings(
    cases: Sequence[BenchmarkCase],
    ct: Volume,
    variants: dict[str, RegistrationSettings],
    *,
    labels: Volume | None = None,
    progress: bool = True,
) -> dict:
    """Register every case with every variant (name -> settings; the first is the
    reference), alternating per case, after one unscored registration per variant (the
    first call's compilation and caches). Returns, per variant, its ``summarize`` summary,
    the per-case time ratio to the reference (median, min, max), the median mTRE over the
    cases the reference reported ok, and the cases whose status or success differs from
    the reference's; and every record (JSON-ready)."""
    if not cases or not variants:
        raise EvaluationError("a comparison needs at least one case and one variant")
    registrators = {name: Registrator(ct, labels=labels, settings=s) for name, s in variants.items()}
    for registrator in registrators.values():
        _score(registrator, cases[0])
    records: dict[str, list[dict]] = {name: [] for name in variants}
    t0 = time.perf_counter()
    for done, case in enumerate(cases, start=1):
        for name, registrator in registrators.items():
            records[name].append(_score(registrator, case))
        if progress:
            print(progress_line(done, len(cases), time.perf_counter() - t0), end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    reference = records[next(iter(variants))]
    result = {}
    for name, recs in records.items():
        timed = [(r["time_s"], ref["time_s"]) for r, ref in zip(recs, reference)
                 if "time_s" in r and "time_s" in ref]
        ratios = [t / t_ref for t, t_ref in timed if t_ref > 0.0]
        result[name] = {
            "settings": _changed_settings(variants[name]),
            "summary": summarize(recs),
            "time_ratio": {"median": quantile(ratios, 0.5), "min": min(ratios, default=None),
                           "max": max(ratios, default=None)},
            "mtre_where_reference_ok_mm": quantile([r["final_mtre_mm"] for r, ref in zip(recs, reference)
                                                    if ref["status"] == "ok" and "final_mtre_mm" in r], 0.5),
            "outcome_changes": [r["case_id"] for r, ref in zip(recs, reference)
                                if (r["status"], r["success"]) != (ref["status"], ref["success"])],
        }
    return {"variants": result, "records": records}


def format_comparison(comparison: dict) -> str:
    """A markdown table of ``compare_settings``'s result, one row per variant."""
    def cell(value, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = ["| variant | changed settings | success | ok & correct / ok & wrong / failed & correct / failed & wrong "
             "| mTRE median (mm) | mTRE where the reference is ok (mm) | time_s median | time ratio per case "
             "(median, min-max) | outcome changes |",
             "|" + "---|" * 9]
    for name, v in comparison["variants"].items():
        s, g, ratio = v["summary"], v["summary"]["quality_gate"], v["time_ratio"]
        changed = ", ".join(f"{k}={val!r}" for k, val in v["settings"].items()) or "defaults"
        lines.append(
            f"| {name} | {changed} | {100.0 * s['success_rate']:.0f}% | {g['ok_correct']} / {g['ok_wrong']} / "
            f"{g['failed_correct']} / {g['failed_wrong']} | {cell(s['final_mtre_mm']['median'])} | "
            f"{cell(v['mtre_where_reference_ok_mm'])} | {cell(s['time_s']['median'])} | "
            f"{cell(ratio['median'], 3)} ({cell(ratio['min'])}-{cell(ratio['max'])}) | "
            f"{', '.join(v['outcome_changes']) or 'none'} |")
    return "\n".join(lines)
