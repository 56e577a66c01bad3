"""The self-contained HTML page of a cohort: summary, flags, plots, the table (see :mod:`.assets`)."""

from __future__ import annotations

import csv
import datetime as _dt
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from nir_lightning._version import __version__
from nir_lightning.app.report import plots
from nir_lightning.app.report.assets import CSS, JS
from nir_lightning.app.report.cohort import SHOWN_CONFIG, Cohort
from nir_lightning.app.report.flags import MIN_COHORT, Flag, worst_first
from nir_lightning.app.report.table import METRIC_COLUMNS, cohort_rows, describe, relative_link
from nir_lightning.errors import InputError

FLAG_LIST_MIN_SEVERITY = 45
"""Flags at least this severe are listed at the top; milder ones (folds, resampled inputs) only in the table."""
FLAG_LIST_MAX = 200
"""At most this many pairs in the flag list (the table holds them all)."""
STAT_KEYS: tuple[tuple[str, str], ...] = (
    ("dice_before", "Dice before"), ("dice_affine", "Dice after affine"), ("dice_after", "Dice after"),
    ("hd95_after", "HD95 after (mm)"), ("folding_percent", "folds (%)"), ("sdlogj", "SDlogJ"), ("seconds_total", "seconds"),
)


def label_names(path: str | Path | None) -> dict[str, str]:
    """Label value -> name from a TSV/CSV whose first column is the label and second (or a
    ``name`` column) its name; a header row is allowed. ``{}`` for ``None``.

    Raises :class:`InputError` naming the file when it cannot be read.
    """
    if path is None:
        return {}
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--labels '{p}' could not be read ({exc}); give a TSV whose first column is the label value and second its name.") from exc
    delim = "\t" if "\t" in text else ","
    names: dict[str, str] = {}
    name_col = 1
    for i, row in enumerate(csv.reader(text.splitlines(), delimiter=delim)):
        cells = [c.strip() for c in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        try:
            value = int(float(cells[0]))
        except ValueError:
            if i == 0:  # header: use its name column if it has one
                lowered = [c.lower() for c in cells]
                name_col = next((k for k, c in enumerate(lowered) if c in ("name", "label_name", "structure")), 1)
            continue
        names[str(value)] = cells[name_col] if len(cells) > name_col and cells[name_col] else str(value)
    return names


def _labels_from_config(cohort: Cohort) -> dict[str, str]:
    """Names from the ``--labels`` TSV the runs were given, when it is still there."""
    for p in cohort.completed:
        spec = ((p.metrics.get("config") or {}).get("data") or {}).get("labels")
        if isinstance(spec, str) and Path(spec).suffix.lower() in (".tsv", ".csv", ".txt") and Path(spec).is_file():
            try:
                return label_names(spec)
            except InputError:
                return {}
    return {}


def _num(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _summary(cohort: Cohort) -> str:
    done, failed, pending = (len(cohort.by_status(s)) for s in ("completed", "failed", "pending"))
    out = [(f'<div class="counts"><span><b>{len(cohort.pairs)}</b> pairs</span><span><b>{done}</b> done</span>'
            f'<span><b>{failed}</b> failed</span><span><b>{pending}</b> pending</span></div>')]
    rows = []
    for key, name in STAT_KEYS:
        vals = [v for v in (p.number(key) for p in cohort.completed) if v is not None]
        if vals:
            d = describe(vals)
            fmt = ".3f" if key.startswith(("dice", "sdlogj")) else ".4g"
            rows.append(f"<tr><td>{name}</td><td>{d['n']}</td><td>{d['mean']:{fmt}} &plusmn; {d['sd']:{fmt}}</td><td>{d['median']:{fmt}}</td></tr>")
    if rows:
        out.append('<table class="stats"><tr><th>metric</th><th>n</th><th>mean &plusmn; sd</th><th>median</th></tr>' + "".join(rows) + "</table>")
    chain = [describe(v) for v in ([x for x in (p.number(k) for p in cohort.completed) if x is not None] for k in ("dice_before", "dice_affine", "dice_after")) if v]
    if len(chain) > 1:
        out.append("<p>Dice (mean &plusmn; sd, median): " + " &rarr; ".join(f"{d['mean']:.3f} &plusmn; {d['sd']:.3f} ({d['median']:.3f})" for d in chain) + "</p>")
    return "".join(out)


def _provenance(cohort: Cohort) -> tuple[str, list[str]]:
    """The versions and shared settings of the runs, and warnings when they are mixed."""
    warnings: list[str] = []
    versions = cohort.versions()
    text = "version " + ", ".join(f"{v} ({n} pairs)" if len(versions) > 1 else v for v, n in versions.most_common())
    if len(versions) > 1:
        warnings.append(f"The folder mixes results of {len(versions)} versions ({', '.join(f'{v}: {n}' for v, n in versions.most_common())}); "
                        "pairs of the minority versions are flagged 'version'. Rerun them (register-many --overwrite) to compare like with like.")
    groups = cohort.config_groups()
    if groups:
        shown = []
        for name, key in SHOWN_CONFIG.items():
            v = groups[0][0].get(key)
            if v is not None:
                shown.append(f"{name}={str(v).rsplit('.', 1)[-1] if name in ('field', 'sampler') else v}")
        text += "; config: " + ", ".join(shown)
    if len(groups) > 1:
        base = groups[0][0]
        parts = []
        for cfg, ids in groups[1:4]:
            diff = sorted(k for k in set(base) | set(cfg) if base.get(k) != cfg.get(k))
            parts.append(f"{len(ids)} pair(s) ({', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}) differ in "
                         + ", ".join(f"{k}={cfg.get(k)!r} (most: {base.get(k)!r})" for k in diff[:6]) + (" ..." if len(diff) > 6 else ""))
        warnings.append(f"The folder mixes {len(groups)} run configurations: " + "; ".join(parts) + ".")
    if __version__ not in versions and versions:
        text += f" (this report: {__version__})"
    return text, warnings


def _flag_list(rows: Sequence[Mapping[str, Any]]) -> str:
    serious = [r for r in rows if r["severity"] >= FLAG_LIST_MIN_SEVERITY]
    minor = sum(1 for r in rows if 0 < r["severity"] < FLAG_LIST_MIN_SEVERITY)
    items = []
    for r in serious[:FLAG_LIST_MAX]:
        texts = "".join(f"<li>{escape(t)}</li>" for t in r["flag_text"])
        items.append(f'<li data-id="{escape(r["id"])}"><span class="sev s{r["severity"]}">{r["severity"]}</span> '
                     f'<a class="goto" href="#" data-id="{escape(r["id"])}"><b>{escape(r["id"])}</b></a> '
                     f'<span class="muted">{escape(", ".join(dict.fromkeys(r["flags"])))}</span><ul>{texts}</ul></li>')
    html = f'<ol id="flags">{"".join(items)}</ol>' if items else '<p id="noflags">No pair needs a look: nothing failed, no warning, no outlier.</p>'
    if len(serious) > FLAG_LIST_MAX:
        html += f"<p>{len(serious) - FLAG_LIST_MAX} more flagged pairs: see the table (tick 'flagged only').</p>"
    if minor:
        html += f'<p class="muted">{minor} pair(s) with minor flags only (folds, resampled inputs, other version): in the table, tick "flagged only".</p>'
    return html


def _plots(cohort: Cohort, rows: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> str:
    flagged = {r["id"] for r in rows if r["severity"] >= FLAG_LIST_MIN_SEVERITY}
    after = {p.id: v for p in cohort.completed if (v := p.number("dice_after")) is not None}
    pairs = {p.id: (b, a) for p in cohort.completed if (b := p.number("dice_before")) is not None and (a := p.number("dice_after")) is not None}
    per_label: dict[str, list[float]] = {}
    for p in cohort.completed:
        d = p.metrics.get("dice_per_label")
        if isinstance(d, dict):
            for k, v in d.items():
                if isinstance(v, (int, float)):
                    per_label.setdefault(str(k), []).append(float(v))
    ordered = sorted(per_label, key=lambda k: (not k.lstrip("-").isdigit(), int(k) if k.lstrip("-").isdigit() else 0, k))
    boxes = {(f"{names[k]} ({k})" if k in names else k): per_label[k] for k in ordered}
    figs = [
        ("Dice after: distribution (red: flagged pairs)", plots.histogram(after, flagged)),
        ("Dice before and after, per pair (dashed: no change)", plots.scatter(pairs, flagged)),
        ("Dice after per structure, across the cohort", plots.boxes(boxes)),
    ]
    return '<div class="plots">' + "".join(f"<figure><figcaption>{escape(c)}</figcaption>{s}</figure>" for c, s in figs) + "</div>"


def _table(rows: Sequence[Mapping[str, Any]], page: Path) -> str:
    heads = ['<th data-k="severity" data-t="num" data-first="desc" title="worst flag (100: failed)">flag</th>',
             '<th data-k="id">id</th>', '<th data-k="status">status</th>', '<th data-k="fixed">fixed</th>', '<th data-k="moving">moving</th>']
    heads += [f'<th data-k="{c.key}" data-t="num" title="{escape(c.help)}">{escape(c.header)}</th>' for c in METRIC_COLUMNS]
    heads += ['<th data-k="flags">flags</th>', '<th data-k="qc" title="click to enlarge">QC</th>']
    body = []
    for r in rows:
        rid = escape(r["id"])
        folder = relative_link(r["folder"], page)
        qc = relative_link(r["qc"], page)
        link = f'<a href="{escape(folder)}/">{rid}</a>' if folder else rid
        cells = [f'<td data-v="{r["severity"]}"><span class="sev s{r["severity"]}">{r["severity"] or ""}</span></td>',
                 f"<td>{link}</td>", f"<td>{r['status']}</td>",
                 f'<td class="in" title="{escape(r["fixed_full"])}">{escape(r["fixed"])}</td>',
                 f'<td class="in" title="{escape(r["moving_full"])}">{escape(r["moving"])}</td>']
        cells += [f'<td class="n" data-v="{"" if r[c.key] is None else repr(float(r[c.key]))}">{_num(r[c.key], c.fmt)}</td>' for c in METRIC_COLUMNS]
        what = ", ".join(dict.fromkeys(r["flags"])) or ""
        if r["status"] != "completed" and r["message"]:
            what = (what + ": " if what else "") + r["message"][:300]
        cells.append(f'<td class="flags" title="{escape(" | ".join(r["flag_text"]))}">{escape(what)}</td>')
        cells.append(f'<td><img class="thumb" loading="lazy" src="{escape(qc)}" data-id="{rid}" data-folder="{escape(folder or "")}/" alt="QC of {rid}"></td>' if qc else "<td></td>")
        body.append(f'<tr class="{r["status"]}" data-id="{rid}" data-status="{r["status"]}" data-sev="{r["severity"]}">' + "".join(cells) + "</tr>")
    controls = ('<div id="controls"><input id="filter" type="search" placeholder="filter: id, path, flag ..."> '
                '<select id="status"><option value="">any status</option><option>completed</option><option>failed</option><option>pending</option></select> '
                '<label><input id="flagged" type="checkbox"> flagged only</label> <span id="shown" class="muted"></span></div>')
    return controls + f'<table id="pairs"><thead><tr>{"".join(heads)}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render(cohort: Cohort, flags: dict[str, list[Flag]], *, page: Path, labels_tsv: str | Path | None = None) -> str:
    """The report's HTML for ``cohort`` with ``flags``, with links relative to ``page``."""
    names = label_names(labels_tsv) if labels_tsv is not None else _labels_from_config(cohort)
    rows = cohort_rows(cohort, flags, worst_first(cohort, flags))
    provenance, warnings = _provenance(cohort)
    if cohort.by_status("pending"):
        ids = [p.id for p in cohort.by_status("pending")]
        warnings.append(f"{len(ids)} pair(s) pending (running, interrupted or half-written; grey rows): {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}. "
                        "This report shows what is done; it is rewritten when register-many finishes.")
    if 0 < len(cohort.completed) < MIN_COHORT:
        warnings.append(f"Only {len(cohort.completed)} completed pair(s): too few for cohort outliers (needs {MIN_COHORT}); only the runs' own warnings are flagged.")
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"nir register-many report: {cohort.folder.name or cohort.folder}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p class=\"muted\">{escape(str(cohort.folder.resolve()))} &middot; {when} &middot; nir_lightning {__version__}</p>"
        f"<p>{escape(provenance)}</p>" + "".join(f'<div class="warn">{escape(w)}</div>' for w in warnings)
        + "<h2>Summary</h2>" + _summary(cohort)
        + "<h2>Flags, worst first</h2>" + _flag_list(rows)
        + "<h2>Plots</h2>" + _plots(cohort, rows, names)
        + "<h2>Every pair</h2>" + _table(rows, page)
        + '<div id="modal" hidden><img alt="QC figure"><a href="#">open the folder</a></div>'
        + f'<pre id="selftest" hidden></pre><script>{JS}</script></body></html>\n'
    )
