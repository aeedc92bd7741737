"""Write an evaluation's files: metrics.json, scores.csv, plots, thumbnails and a self-contained report.html.

Everything the HTML shows lives inside the output folder and is referenced by relative path, so the folder
can be moved, zipped or served as it is. The page carries a tiny script that, once the window has loaded,
records how many of its images decoded (`#image-check`), which `scripts/check_report.py` reads back from a
headless browser.
"""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_text
from .provenance import folder_provenance
from .result import EvaluationResult
from .stats import SMALL_N

THUMBNAIL_SIZE = 256  # longest side of the copied images, in pixels


def _align(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the rest right-aligned."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def format_table(result: EvaluationResult) -> str:
    """The means (with CIs) and win rates as plain-text tables, as printed at the end of `diffalign evaluate`."""
    ci = f"{round(result.level * 100)}% CI"
    rows = [["reward / folder", "n", "mean", ci]]
    for reward, per in result.means.items():
        for label, iv in per.items():
            rows.append([f"{reward} / {label}", str(iv.n), f"{iv.estimate:.4f}", f"[{iv.low:.4f}, {iv.high:.4f}]"])
    lines = _align(rows)
    if result.win_rates:
        rows = [["reward / folder vs baseline", "wins/(wins+losses)", ci, "ties split", ci, "wins", "ties", "losses",
                 "pairs", "unmatched"]]
        for reward, per in result.win_rates.items():
            for (label, base), wr in per.items():
                rows.append([f"{reward} / {label} vs {base}", f"{wr.decisive:.3f}",
                             f"[{wr.decisive_low:.3f}, {wr.decisive_high:.3f}]", f"{wr.tie_split:.3f}",
                             f"[{wr.tie_split_low:.3f}, {wr.tie_split_high:.3f}]", str(wr.wins), str(wr.ties),
                             str(wr.losses), str(wr.pairs), f"{wr.unmatched_a}+{wr.unmatched_b}"])
        lines += [""] + _align(rows)
    lines += _distribution_lines(result, ci)
    small = small_samples(result)
    if small:
        lines += ["", f"note: fewer than {SMALL_N} images or pairs for {', '.join(small)}: their intervals mean little"]
    if result.skipped:
        lines += ["", f"skipped {len(result.skipped)} unreadable image(s) (--lenient): listed in metrics.json"]
    return "\n".join(lines)


def small_samples(result: EvaluationResult) -> list[str]:
    """The folders and comparisons measured on fewer than SMALL_N images or pairs."""
    small = [label for label in result.labels if len(result.rows_of(label)) < SMALL_N]
    small += [f"{a} vs {b}" for per in list(result.win_rates.values())[:1] for (a, b), wr in per.items()
              if wr.pairs < SMALL_N]
    return small


def _distribution_lines(result: EvaluationResult, ci: str) -> list[str]:
    """The set-level measures (FD, precision, recall) and their paired differences; nothing without them."""
    if result.distribution_settings is None:
        return []
    settings = result.distribution_settings
    title = f"distribution {settings['spec']} (k={settings['k']}) / folder"
    rows = [[title, "n", "refs", "FD", ci, "precision", ci, "recall", ci]]
    for label, m in result.distribution.items():
        rows.append([label, str(m.fd.n), str(m.n_reference), *_interval_cells(m.fd, 2),
                     *_interval_cells(m.precision, 3), *_interval_cells(m.recall, 3)])
    lines = [""] + _align(rows)
    if result.distribution_differences:
        rows = [["distribution / folder - baseline", "pairs", "FD diff", ci, "precision diff", ci, "recall diff", ci]]
        for (label, base), d in result.distribution_differences.items():
            rows.append([f"{label} - {base}", str(d.fd.n), *_interval_cells(d.fd, 2, "+"),
                         *_interval_cells(d.precision, 3, "+"), *_interval_cells(d.recall, 3, "+")])
        lines += [""] + _align(rows)
    return lines


def _interval_cells(iv, digits: int, sign: str = "") -> list[str]:
    """[estimate, "[low, high]"], `sign` "+" to print the sign of differences."""
    return [f"{iv.estimate:{sign}.{digits}f}", f"[{iv.low:{sign}.{digits}f}, {iv.high:{sign}.{digits}f}]"]


def write_scores_csv(result: EvaluationResult, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "file", "prompt", "seed", *result.rewards])
        for rec, row in zip(result.records, result.scores):
            writer.writerow([rec.label, rec.file, rec.prompt, "" if rec.seed is None else rec.seed,
                             *(repr(float(v)) for v in row)])


def _figure(ncols: int, height: float = 3.2):
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(3.6 * ncols, 4.0), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, k + 1) for k in range(ncols)]


def plot_means(result: EvaluationResult, path: Path) -> None:
    """One panel per reward (their scales differ): points = means, error bars = bootstrap CI."""
    fig, axes = _figure(len(result.rewards))
    for ax, reward in zip(axes, result.rewards):
        per = result.means[reward]
        labels = list(per)
        means = np.array([per[l].estimate for l in labels])
        err = np.array([[per[l].estimate - per[l].low for l in labels], [per[l].high - per[l].estimate for l in labels]])
        # Points, not bars: the y-axis is zoomed on the intervals, so a bar's length would mean nothing.
        ax.errorbar(range(len(labels)), means, yerr=err, fmt="o", capsize=6, color="#4c78a8")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_title(reward)
        ax.set_ylabel(f"mean ({round(result.level * 100)}% CI)")
        ends = np.concatenate([[per[l].low for l in labels], [per[l].high for l in labels]])
        ends = ends[np.isfinite(ends)]
        if ends.size:  # zoom on the intervals: reward scales rarely start at 0 in a useful way
            pad = max(float(np.ptp(ends)) * 0.3, 1e-3)
            ax.set_ylim(float(ends.min()) - pad, float(ends.max()) + pad)
    fig.savefig(path, dpi=110)


def plot_win_rates(result: EvaluationResult, path: Path) -> None:
    """One panel per reward: the win rate with ties split (0.5 = parity whatever the share of ties) of each folder
    against each baseline, CI bars, and wins / ties / losses written beside each bar."""
    fig, axes = _figure(len(result.win_rates))
    for ax, (reward, per) in zip(axes, result.win_rates.items()):
        names = [f"{a} vs {b}" for a, b in per]
        rates = np.array([wr.tie_split for wr in per.values()])
        err = np.array([[wr.tie_split - wr.tie_split_low for wr in per.values()],
                        [wr.tie_split_high - wr.tie_split for wr in per.values()]])
        ax.barh(range(len(names)), rates, xerr=err, capsize=5, height=0.5, color="#f58518")
        for y, wr in enumerate(per.values()):  # the numbers too: a rate of 0 draws no bar at all
            ax.text(0.02, y + 0.3, f"{wr.tie_split:.2f}  ({wr.wins} W / {wr.ties} T / {wr.losses} L)", fontsize=8)
        ax.set_ylim(-0.6, len(names) - 0.2)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlim(0, 1)
        ax.set_title(reward)
        ax.set_xlabel("win rate, ties split (0.5 = parity)")
    fig.savefig(path, dpi=110)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "folder"


def grid_keys(result: EvaluationResult, rows: int) -> list[tuple]:
    """(prompt, seed) keys for the image grid, spread over the prompts: among the keys most folders share, the
    first key of each prompt (in first-seen order), then the second of each, and so on."""
    first_seen: dict[tuple, int] = {}
    present: dict[tuple, set] = {}
    for i, rec in enumerate(result.records):
        first_seen.setdefault(rec.key, i)
        present.setdefault(rec.key, set()).add(rec.label)
    rank: dict[tuple, int] = {}  # how many keys of the same prompt (and coverage) come before this one
    seen: dict[tuple, int] = {}
    for key in sorted(first_seen, key=first_seen.get):
        group = (len(present[key]), key[0])
        rank[key] = seen.get(group, 0)
        seen[group] = rank[key] + 1
    keys = sorted(first_seen, key=lambda k: (-len(present[k]), rank[k], first_seen[k]))
    return keys[:rows]


def write_thumbnails(result: EvaluationResult, keys: list[tuple], out: Path) -> dict[tuple, dict[str, tuple[str, int]]]:
    """Copy (downscaled) the grid's images into out/images/; {key: {label: (relative src, record row)}}."""
    from PIL import Image

    wanted = set(keys)
    cells: dict[tuple, dict[str, tuple[str, int]]] = {k: {} for k in keys}
    slugs = {label: f"{k:02d}_{_slug(label)}" for k, label in enumerate(result.labels)}
    for i, rec in enumerate(result.records):
        if rec.key not in wanted or rec.label in cells[rec.key]:
            continue
        rel = f"images/{slugs[rec.label]}/{i:05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(rec.path) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            thumb.save(out / rel)
        cells[rec.key][rec.label] = (rel, i)
    return cells


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
figure.lead { margin: 8px 0 24px; } figure.lead img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
figure.lead figcaption { color: #555; font-size: 90%; margin-top: 4px; }
table { border-collapse: collapse; margin: 12px 0 24px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid img { width: 160px; height: auto; image-rendering: pixelated; display: block; }
.grid .score { font-size: 12px; color: #555; }
.plots img { max-width: 100%; margin-right: 16px; }
.note { color: #666; font-size: 13px; }
"""

# Counts images that actually decoded once the page (and every image) has loaded; read by check_report.py.
_IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var el = document.getElementById("image-check");
  el.setAttribute("data-loaded", String(loaded));
  el.setAttribute("data-total", String(images.length));
  el.textContent = loaded + " of " + images.length + " images loaded";
});
</script>
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _means_table(result: EvaluationResult) -> str:
    pct = round(result.level * 100)
    head = "".join(f"<th>{_e(r)}" + (f"<br><span class='note'>{_e(result.reward_specs[r])}</span>"
                                      if result.reward_specs[r] != r else "") + "</th>" for r in result.rewards)
    rows = []
    for label in result.labels:
        cells = "".join(
            f"<td class='num'>{iv.estimate:.4f} <span class='note'>[{iv.low:.4f}, {iv.high:.4f}]</span></td>"
            for iv in (result.means[r][label] for r in result.rewards))
        n = result.means[result.rewards[0]][label].n
        role = " (baseline)" if label in result.baselines else ""
        made = folder_provenance(result.folders[label])
        small = f" (fewer than {SMALL_N}: the interval means little)" if n < SMALL_N else ""
        rows.append(f"<tr><th>{_e(label)}{role}<br><span class='note'>{n} images scored{small}</span>"
                    + (f"<br><span class='note'>{_e(made)}</span>" if made else "") + f"</th>{cells}</tr>")
    return (f"<h2>Mean reward ({pct}% bootstrap CI)</h2><table><tr><th>folder (what made it)</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def _win_table(result: EvaluationResult) -> str:
    if not result.win_rates:
        return "<p class='note'>No baseline given: no win rates.</p>"
    rows = []
    for reward, per in result.win_rates.items():
        for (label, base), wr in per.items():
            small = " <span class='note'>(few pairs)</span>" if wr.pairs < SMALL_N else ""
            rows.append(
                f"<tr><td>{_e(reward)}</td><td>{_e(label)} vs {_e(base)}{small}</td>"
                f"<td class='num'>{wr.decisive:.3f} <span class='note'>[{wr.decisive_low:.3f}, "
                f"{wr.decisive_high:.3f}]</span></td><td class='num'>{wr.tie_split:.3f} <span class='note'>"
                f"[{wr.tie_split_low:.3f}, {wr.tie_split_high:.3f}]</span></td>"
                f"<td class='num'>{wr.wins}</td><td class='num'>{wr.ties}</td><td class='num'>{wr.losses}</td>"
                f"<td class='num'>{wr.pairs}</td><td class='num'>{wr.unmatched_a} / {wr.unmatched_b}</td></tr>")
    pct = round(result.level * 100)
    return ("<h2>Win rate against baseline</h2><p class='note'>Pairs are the same prompt and seed in both folders. "
            "wins/(wins+losses): the share of the pairs that differ which the folder wins; ties split: a tie counts "
            "half to each side. For both, 0.5 is parity.</p><table><tr><th>reward</th><th>comparison</th>"
            f"<th>wins/(wins+losses) ({pct}% CI)</th><th>ties split ({pct}% CI)</th><th>wins</th><th>ties</th>"
            f"<th>losses</th><th>pairs</th><th>unmatched (folder / baseline)</th></tr>{''.join(rows)}</table>")


def _interval_cell(iv, digits: int, sign: str = "") -> str:
    estimate, interval = _interval_cells(iv, digits, sign)
    return f"<td class='num'>{estimate} <span class='note'>{interval}</span></td>"


def _distribution_html(result: EvaluationResult) -> str:
    """The set-level measures' tables and what they mean; empty without them."""
    if result.distribution_settings is None:
        return ""
    settings, pct = result.distribution_settings, round(result.level * 100)
    rows = "".join(
        f"<tr><th>{_e(label)}{' (baseline)' if label in result.baselines else ''}</th><td class='num'>{m.fd.n}</td>"
        f"<td class='num'>{m.n_reference}</td>{_interval_cell(m.fd, 2)}{_interval_cell(m.precision, 3)}"
        f"{_interval_cell(m.recall, 3)}</tr>" for label, m in result.distribution.items())
    out = (f"<h2>Distribution against ground truth ({pct}% bootstrap CI)</h2><p class='note'>{_e(settings['spec'])}: "
           f"k={settings['k']}, {settings['references_per_image']} reference render(s) per image, reference VAE "
           f"{_e(settings['reference_vae'])}, {settings['bootstrap']} resamples</p>"
           "<table><tr><th>folder</th><th>images</th><th>references</th><th>FD (lower is better)</th>"
           f"<th>precision</th><th>recall</th></tr>{rows}</table>")
    if result.distribution_differences:
        rows = "".join(
            f"<tr><td>{_e(label)} &minus; {_e(base)}</td><td class='num'>{d.fd.n}</td>{_interval_cell(d.fd, 2, '+')}"
            f"{_interval_cell(d.precision, 3, '+')}{_interval_cell(d.recall, 3, '+')}"
            f"<td class='num'>{d.unmatched_a} / {d.unmatched_b}</td></tr>"
            for (label, base), d in result.distribution_differences.items())
        out += ("<table><tr><th>folder &minus; baseline</th><th>pairs</th><th>FD difference</th>"
                "<th>precision difference</th><th>recall difference</th><th>unmatched (folder / baseline)</th></tr>"
                f"{rows}</table>")
    return out + (
        "<p class='note'>Features: the toy judge's pooled penultimate layer. Reference: ground-truth renders of the "
        "same prompts (unnamed attributes as the training data has them given the caption), through the VAE "
        "round trip unless stated otherwise. FD: Fréchet distance between Gaussian fits of the two feature sets, "
        "biased upwards at small n (compare sets of equal size). Precision: share of the folder's images inside "
        "the reference's k-NN manifold; recall: share of the references inside the folder's. Differences are "
        "folder minus baseline on images matched by (prompt, seed), resampled in pairs. Intervals: bootstrap "
        "resamples within each prompt, percentile interval re-centred on the estimate.</p>")


def _grid_html(result: EvaluationResult, keys: list[tuple], cells: dict) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for label in result.labels)
    rows = []
    for key in keys:
        prompt, seed = key
        tds = []
        for label in result.labels:
            if label not in cells[key]:
                tds.append("<td class='note'>(none)</td>")
                continue
            src, i = cells[key][label]
            scores = "<br>".join(f"{_e(r)} {result.scores[i, k]:.3f}" for k, r in enumerate(result.rewards))
            tds.append(f"<td><img src='{_e(src)}' alt='{_e(label)}: {_e(prompt)}'><div class='score'>{scores}</div></td>")
        shown = _e(prompt) or "<i>(empty prompt)</i>"
        rows.append(f"<tr><td>{shown}<br><span class='note'>seed {_e(seed)}</span></td>{''.join(tds)}</tr>")
    return (f"<h2>Samples (same prompt and seed in a row)</h2><table class='grid'><tr><th>prompt</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def _lead_html(lead: tuple[str, str] | None) -> str:
    """The picture a report opens with (an image file beside report.html, and its caption), if any."""
    if lead is None:
        return ""
    src, caption = lead
    return (f"<figure class='lead'><img src='{_e(src)}' alt='{_e(caption)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def render_html(result: EvaluationResult, keys: list[tuple], cells: dict, plots: list[str],
                lead: tuple[str, str] | None = None) -> str:
    skipped = (f"<p><b>Skipped {len(result.skipped)} unreadable image(s)</b> (--lenient); listed in metrics.json.</p>"
               if result.skipped else "")
    plot_tags = "".join(f"<img src='{_e(p)}' alt='{_e(p)}'>" for p in plots)
    definitions = (
        f"<p class='note'>Mean: average reward over a folder's images; CI: percentile bootstrap over images "
        f"({result.bootstrap} resamples, seed {result.seed}). Win rate: share of image pairs with the same prompt and "
        "seed where the folder's reward is strictly higher than the baseline's; ties are counted separately; "
        "images without a partner are unmatched and not used; CI: percentile bootstrap over pairs.</p>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>diffalign evaluation</title>"
            f"<style>{_STYLE}</style></head><body><h1>diffalign evaluation</h1>"
            f"{_lead_html(lead)}<p id='image-check' class='note'>images not checked yet</p>{skipped}"
            f"{_means_table(result)}{_win_table(result)}{definitions}{_distribution_html(result)}"
            f"<h2>Plots</h2><div class='plots'>{plot_tags}</div>{_grid_html(result, keys, cells)}"
            f"{_IMAGE_CHECK}</body></html>")


def write_report(result: EvaluationResult, out_dir: str | Path, grid_rows: int = 12,
                 lead: tuple[str, str] | None = None) -> Path:
    """Write metrics.json, scores.csv, means.png (+ win_rates.png), images/ and report.html; returns report.html.

    `lead`: (file name of an image in `out_dir`, caption), the picture the report opens with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(result.to_json(), indent=2, allow_nan=True) + "\n")
    write_scores_csv(result, out / "scores.csv")
    plots = []
    if result.rewards and result.records:
        plot_means(result, out / "means.png")
        plots.append("means.png")
    if result.win_rates:
        plot_win_rates(result, out / "win_rates.png")
        plots.append("win_rates.png")
    keys = grid_keys(result, grid_rows)
    cells = write_thumbnails(result, keys, out)
    path = out / "report.html"
    atomic_write_text(path, render_html(result, keys, cells, plots, lead))
    return path
