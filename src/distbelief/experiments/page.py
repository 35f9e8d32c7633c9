"""An experiment's one HTML page, in ``distbelief report``'s style: the paper's statement, the
verdict table, the figures embedded as base64 (it opens offline) and the runs."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Verdict

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 90em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
         overflow-wrap: break-word; vertical-align: top; }
.wide { max-width: 100%; overflow-x: auto; }
blockquote { border-left: 4px solid #ccc; margin: 0.5em 0; padding: 0.2em 1em; color: #444; }
td.holds { background: #d9f2d9; } td.does-not-hold { background: #f8d4d4; }
td.inconclusive { background: #fff3c4; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0.6em; }
@media (max-width: 60em) { .plots { grid-template-columns: minmax(0, 1fr); } }
figure { margin: 0; }
img { width: 100%; height: auto; border: 1px solid #eee; }
small { color: #666; }
"""


def render(results: dict[str, Any], verdicts: Sequence[Verdict], images: Sequence[Path]) -> str:
    """The page of one experiment's ``results.json`` content, verdicts and figures."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(v.claim)}</td><td>{esc(v.measured)}</td><td>{esc(v.rule)}</td>"
        f'<td class="{v.verdict.replace(" ", "-")}"><b>{esc(v.verdict)}</b></td></tr>'
        for v in verdicts
    )
    figures = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"></figure>'
        for p in images
    )
    settings = "".join(
        f"<tr><th>{esc(str(k))}</th><td>{esc(_show(v))}</td></tr>"
        for k, v in results["sizes"].items()
    )
    runs = "".join(
        f"<tr><td>{esc(r['name'])}</td><td>{'diverged' if r['diverged'] else ''}</td>"
        f"<td>{_num(r.get('val_accuracy'))}</td><td>{_num(r.get('test_accuracy'))}</td></tr>"
        for r in results["runs"]
    )
    timed = (
        "<p><small>Its verdict rests on time: on <code>simulated</code> the modelled "
        "cluster's virtual time (reproducible from the seed), on any other runtime real wall "
        "time (taken under whatever load the machine had: "
        f"{esc(results['load'])}).</small></p>"
        if results["timed"]
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>distbelief experiment {esc(results["experiment"])}</title>
<style>{STYLE}</style></head><body>
<h1>{esc(results["experiment"])}: {esc(results["title"])}</h1>
<p>Dean et al. (2012), section {esc(results["section"])}:</p>
<blockquote>{esc(results["statement"])}</blockquote>
<p>Runtime <code>{esc(results["runtime"])}</code>, {"quick" if results["quick"] else "full"}
sizes, seeds {esc(", ".join(str(s) for s in results["seeds"]))};
{len(results["runs"])} runs in {results["elapsed_s"]:.0f} s.</p>{timed}
<h2>Verdict</h2><div class="wide"><table>
<tr><th>claim</th><th>measured</th><th>rule (fixed in the code before the run)</th>
<th>verdict</th></tr>{rows}</table></div>
<h2>Figures</h2><div class="plots">{figures}</div>
<h2>Sweep</h2><div class="wide"><table>{settings}</table></div>
<h2>Runs</h2><p><small>Each in <code>runs/NAME</code> beside this page
(<code>distbelief report</code> draws any of them). Validation accuracy picks learning
rates; test accuracy is only reported.</small></p>
<div class="wide"><table><tr><th>run</th><th></th><th>validation accuracy</th>
<th>test accuracy</th></tr>{runs}</table></div>
</body></html>
"""


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(v)}" for k, v in value.items())
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """The verdict table of a ``results.json`` as Markdown (for docs/paper.md)."""
    lines = ["| claim | measured | rule | verdict |", "| --- | --- | --- | --- |"]
    for v in results["verdicts"]:
        cells = [v["claim"], v["measured"], v["rule"], f"**{v['verdict']}**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
