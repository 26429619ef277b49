"""`compare`: two eval reports side by side, with the change of every cell (B - A)."""

from __future__ import annotations

import json
from pathlib import Path

from storage.errors import UserError

METRICS = ("acc", "ap", "auc")


def load_report(folder: Path) -> dict:
    """An eval folder's report.json."""
    path = Path(folder) / "report.json"
    if not path.exists():
        raise UserError(f"{path}: no eval report there; run `dnf-pipeline eval` first")
    return json.loads(path.read_text())


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _delta(a, b) -> str:
    return "-" if a is None or b is None else f"{100 * (b - a):+.1f}"


def compare_markdown(a_dir: Path, b_dir: Path) -> str:
    """A table per metric group: rows are sources (and overall, and each perturbation's overall)."""
    a, b = load_report(a_dir), load_report(b_dir)
    rows: list[tuple[str, dict | None, dict | None]] = []
    for src in sorted(set(a["sources"]) | set(b["sources"])):
        rows.append((src, a["sources"].get(src), b["sources"].get(src)))
    rows.append(("**overall**", a["overall"], b["overall"]))
    for spec in sorted(set(a.get("perturbations", {})) & set(b.get("perturbations", {}))):
        rows.append((f"**overall, {spec}**", a["perturbations"][spec]["overall"],
                     b["perturbations"][spec]["overall"]))
    head = ["source"] + [f"{m} {side}" for m in METRICS for side in ("A", "B", "delta")]
    lines = [f"A = {a_dir}", f"B = {b_dir}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ra, rb in rows:
        cells = []
        for m in METRICS:
            va, vb = (ra or {}).get(m), (rb or {}).get(m)
            cells += [_pct(va), _pct(vb), _delta(va, vb)]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"
