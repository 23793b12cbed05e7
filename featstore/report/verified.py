"""The verify section: ``featstore verify`` run on the store, its table of checks, first problems and notes, and
the ``--recompute`` differences as a histogram."""

from __future__ import annotations

from featstore.report import figures
from featstore.report.inputs import Inputs, short_error
from featstore.report.page import Section, note, plot, table

SHOW_PER_KIND = 5


def _check_rows(report) -> list[list[str]]:
    from featstore.verify.report import KINDS

    groups = report.by_kind()
    rows = []
    for kind, desc in KINDS.items():
        n = len(groups.get(kind, []))
        status = "FAIL" if n else ("skipped" if kind in report.skipped else "ok")
        why = f" (not run: {report.skipped[kind]})" if status == "skipped" else ""
        rows.append([kind, status, str(n), desc + why])
    return rows


def _recompute_html(rc: dict) -> list[str]:
    errors = rc.get("errors") or []
    if not errors:
        return [note(f"recompute: {rc.get('checked', 0)} records checked, no comparison made")]
    tol = rc.get("tolerance")
    return [f"<h3>Recompute: {rc.get('checked')} records on {rc.get('device')}, worst relative error "
            f"{rc.get('worst_error'):.3g} ({rc.get('worst_key')}), tolerance {tol:.3g}</h3>",
            plot(figures.histograms([("relative error: max |stored - recomputed| / max |recomputed|",
                                      [e["error"] for e in errors], tol, "tolerance (largest)")]),
                 "recompute differences")]


def verify_section(inputs: Inputs) -> Section:
    """Run verify (and its recompute) on the store and show what it found."""
    s = Section("verify", "Verify")
    o = inputs.options
    if not o.verify:
        return s.add(note("not run: pass --verify (and --recompute N to compare N records with a fresh model run)"))
    from featstore.verify import verify

    try:
        report = verify(inputs.location, data_root=o.data_root, seed=o.seed, recompute_n=o.recompute, model=o.model,
                        device=o.device, storage_options=o.storage_options, progress=False)
    except Exception as e:  # noqa: BLE001 - shown on the page; the rest of the report stands
        return s.add(note(f"verification could not run: {short_error(e)}", "bad"))
    verdict = "every check passed" if not report.problems else f"{len(report.problems)} problem(s) found"
    s.add(note(f"{report.records_checked} records checked: {verdict}", "bad" if report.problems else "ok"))
    s.add(table(_check_rows(report), ["check", "status", "problems", "what it checks"]))
    for kind, found in report.by_kind().items():
        rows = [[p.key, p.detail, p.fix] for p in found[:SHOW_PER_KIND]]
        more = f", first {SHOW_PER_KIND}" if len(found) > SHOW_PER_KIND else ""
        s.add(f"<h3>{kind}: {len(found)} problem(s){more}</h3>", table(rows, ["record", "problem", "fix"]))
    info = [[k, str(v)] for k, v in sorted(report.info.items())] + [["note", n] for n in report.notes]
    if info:
        s.add(table(info, ["information", ""]))
    if report.recompute:
        s.add(*_recompute_html(report.recompute))
    return s
