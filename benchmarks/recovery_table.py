"""Markdown table of one or more ``benchmarks/recovery.py`` JSON documents (as in ``RESULTS.md``).

    python benchmarks/recovery_table.py benchmarks/recovery_results.json benchmarks/recovery_archs.json

One row per (family, architecture[, layout]): mean ± std (min) over seeds of MMCS, pattern recovery
(planted features found with the planted presence pattern) and exclusive-call precision/recall (two-model
families), mean explained variance, L0 and dead fraction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "mmcs",
    "pattern_recovery",
    "precision_base_only",
    "precision_ft_only",
    "recall_base_only",
    "recall_ft_only",
)
MEANS = ("explained_variance", "l0", "dead_fraction")


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f} (min {stat['min']:.3f})"


def variant(doc: dict[str, Any]) -> str:
    """The latent layout a document was run with, from its settings ("" for none)."""
    s = doc.get("settings", {})
    parts = []
    if s.get("dedicated_frac"):
        parts.append(f"dedicated {s['dedicated_frac']:g}+{s['dedicated_frac']:g}")
    if s.get("shared_frac"):
        parts.append(f"shared {s['shared_frac']:g}")
    if s.get("extra_train_args"):
        parts.append(s["extra_train_args"])
    return ", ".join(parts)


def rows(doc: dict[str, Any]) -> list[str]:
    k_of = {}
    for r in doc.get("runs", []):
        k_of.setdefault((r["family"], r["arch"]), r.get("k", "-"))
    label = variant(doc)
    out = []
    for family, archs in doc["summary"].items():
        for arch, cell in archs.items():
            name = f"{arch} ({label})" if label else arch
            k = k_of.get((family, arch), "-")
            vals = [_cell(cell.get(c)) for c in COLUMNS]
            means = [f"{cell[m]['mean']:.3f}" if cell.get(m) and cell[m].get("n") else "-" for m in MEANS]
            out.append(f"| {family} | {name} | {k} | " + " | ".join(vals + means) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="recovery.py outputs")
    a = p.parse_args(argv)
    print(
        "| family | arch | k | MMCS | pattern rec. | prec. base | prec. ft | recall base | recall ft "
        "| EV | L0 | dead |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in a.json:
        for line in rows(json.loads(Path(path).read_text())):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
