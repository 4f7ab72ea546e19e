"""Table models and their two renderers (LaTeX with booktabs, and Markdown).

A `Table` is a pure description: rows (method labels), columns (optionally grouped), cells with a
mean, a std and n, and per-column directions for marking the best (bold) and second best
(underlined) value. Ranking uses the displayed (rounded) means, so equal-looking values get the same
mark. A dagger (†) marks a method's average column when the across-dataset test finds it
significantly worse than the control (see `peftbench.report.stats`); single cells get no markers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "†": r"$^\dagger$", "–": "--", "α": r"$\alpha$",
}  # fmt: skip
WIDE = 5  # LaTeX tables with more value columns than this are scaled to \linewidth (needs graphicx)
METRIC_NAMES = {"acc": "Acc.", "map": "mAP", "prec": "Prec"}


def escape_latex(text: str) -> str:
    """Escape LaTeX's special characters (method names contain underscores)."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in str(text))


def escape_markdown(text: str) -> str:
    return str(text).replace("|", r"\|").replace("*", r"\*").replace("_", r"\_")


def metric_name(metric: str) -> str:
    """`map@200` -> `mAP@200`, `map@200_mixed` -> `mAP@200 (mixed)`, `map_mixed` -> `mAP (mixed)`."""
    head, at, tail = metric.partition("@")
    k, _, suffix = tail.partition("_") if at else ("", "", "")
    if not at and head not in METRIC_NAMES and head.partition("_")[0] in METRIC_NAMES:  # family: map_mixed
        head, _, suffix = head.partition("_")
    name = METRIC_NAMES.get(head, head) + (f"@{k}" if k else "")
    return name + (f" ({suffix})" if suffix else "")


@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None
    n: int = 0
    text: str | None = None  # a literal cell (efficiency table), never ranked
    dagger: bool = False


@dataclass
class Column:
    label: str
    group: str = ""
    direction: str | None = None  # None: not ranked
    is_average: bool = False


@dataclass
class Table:
    name: str  # file stem
    caption: str
    columns: list[Column]
    rows: list[str]
    cells: dict[tuple[str, int], Cell]
    decimals: int = 2
    row_header: str = "Method"
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The name restricted to characters safe in a LaTeX label."""
        return "".join(ch if ch.isalnum() or ch in "-.:" else "-" for ch in self.name)

    # ------------------------------------------------------------------ ranking
    def marks(self) -> dict[tuple[str, int], str]:
        """(row, col) -> 'best' | 'second' from rounded means and each column's direction."""
        out: dict[tuple[str, int], str] = {}
        for j, col in enumerate(self.columns):
            if col.direction is None:
                continue
            vals = {
                r: round(c.mean, self.decimals)
                for r in self.rows
                if (c := self.cells.get((r, j))) is not None and c.mean is not None and not math.isnan(c.mean)
            }
            distinct = sorted(set(vals.values()), reverse=col.direction == "higher")
            if len(vals) < 2:
                continue
            for r, v in vals.items():
                if v == distinct[0]:
                    out[(r, j)] = "best"
                elif len(distinct) > 1 and v == distinct[1]:
                    out[(r, j)] = "second"
        return out

    def _value(self, cell: Cell | None, pm: str) -> str:
        if cell is None:
            return "–"
        if cell.text is not None:
            return cell.text
        if cell.mean is None or math.isnan(cell.mean):
            return "–"
        s = f"{cell.mean:.{self.decimals}f}"
        if cell.std is not None and not math.isnan(cell.std):
            s += f"{pm}{cell.std:.{self.decimals}f}"
        return s

    # ------------------------------------------------------------------ LaTeX
    def to_latex(self) -> str:
        """A booktabs `table` float; every label escaped. Preamble: `\\usepackage{booktabs,graphicx}`."""
        marks = self.marks()
        spec = "l" + "".join(
            "l" if c.direction is None and c.label in ("Device",) else "r" for c in self.columns
        )
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{escape_latex(self.caption)}}}",
            rf"\label{{tab:{self.label}}}",
        ]
        wide = len(self.columns) > WIDE
        if wide:  # scale to the text width (needs graphicx) rather than overflow the margin
            lines.append(r"\resizebox{\linewidth}{!}{%")
        lines += [r"\begin{tabular}{" + spec + "}", r"\toprule"]
        groups = self._groups()
        if any(g for g, _, _ in groups):
            head, rules = [""], []
            for g, start, width in groups:
                head.append(
                    rf"\multicolumn{{{width}}}{{c}}{{{escape_latex(g)}}}" if width > 1 else escape_latex(g)
                )
                if g:
                    rules.append(rf"\cmidrule(lr){{{start + 2}-{start + width + 1}}}")
            lines.append(" & ".join(head) + r" \\")
            lines.append(" ".join(rules))
        lines.append(
            " & ".join([escape_latex(self.row_header)] + [escape_latex(c.label) for c in self.columns])
            + r" \\"
        )
        lines.append(r"\midrule")
        for r in self.rows:
            cells = [escape_latex(r)]
            for j in range(len(self.columns)):
                cell = self.cells.get((r, j))
                s = escape_latex(self._value(cell, "\x00")).replace("\x00", r" $\pm$ ")
                if (r, j) in marks:
                    s = (r"\textbf{" if marks[(r, j)] == "best" else r"\underline{") + s + "}"
                if cell is not None and cell.dagger:
                    s += r"$^\dagger$"
                cells.append(s)
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}" + ("}" if wide else "")]
        if self.notes:
            lines.append(
                r"\par\smallskip{\footnotesize " + " ".join(escape_latex(n) for n in self.notes) + "}"
            )
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"

    def _groups(self) -> list[tuple[str, int, int]]:
        """Runs of equal column groups: (group, first column index, width)."""
        out: list[tuple[str, int, int]] = []
        for j, c in enumerate(self.columns):
            if out and out[-1][0] == c.group and c.group:
                g, s, w = out[-1]
                out[-1] = (g, s, w + 1)
            else:
                out.append((c.group, j, 1))
        return out

    # ------------------------------------------------------------------ Markdown
    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table: best in bold, second underlined, † kept."""
        marks = self.marks()
        labels = [f"{c.group} {c.label}".strip() for c in self.columns]
        lines = [
            f"**{escape_markdown(self.caption)}**",
            "",
            "| " + " | ".join([self.row_header] + [escape_markdown(x) for x in labels]) + " |",
            "|" + "---|" + "".join("---:|" for _ in labels),
        ]
        for r in self.rows:
            cells = [escape_markdown(r)]
            for j in range(len(self.columns)):
                cell = self.cells.get((r, j))
                s = escape_markdown(self._value(cell, " ± "))
                if (r, j) in marks:
                    s = f"**{s}**" if marks[(r, j)] == "best" else f"<u>{s}</u>"
                if cell is not None and cell.dagger:
                    s += "†"
                cells.append(s)
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += [""] + [escape_markdown(n) for n in self.notes]
        return "\n".join(lines) + "\n"
