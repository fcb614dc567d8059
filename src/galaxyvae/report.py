"""One self-contained HTML page per evaluated run: tables, figures, configuration and provenance.

The page embeds its figures as base64 PNG and carries its own CSS, so it opens offline, can
be mailed as one file, and refers to nothing outside itself.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import re
from pathlib import Path

from galaxyvae import __version__
from galaxyvae._io import check_writable, write_text_atomic
from galaxyvae.errors import InputError
from galaxyvae.provenance import utc_now

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
PIPELINE_STAGES = ("simulate", "train", "evaluate", "figures", "report")
EVALUATION_SETTINGS = ("n_images", "data", "checkpoint", "importance_samples", "elbo_samples", "seed",
                       "bootstrap", "fit_sky", "pixel_units", "seconds", "created", "command")
"""Entries of evaluation.json shown in the report's evaluation-settings table."""
PAPER = {"mse_win_fraction": 0.971, "likelihood_win_fraction": 0.972}
"""The paper's held-out results against the Gaussian fit (Regier, McAuliffe & Prabhat)."""

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.subtitle { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { background: #eef6ee; border-left: 4px solid #3a8a3a; padding: 0.6em 1em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #333; font-size: 0.92em; margin-top: 0.4em; } figcaption b { color: #000; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
code { background: #f3f3f3; padding: 0 0.2em; }
nav a { margin-right: 1em; }
"""


def write_report(run_dir: str | Path, overwrite: bool = False, seed: int = 0) -> Path:
    """Write RUN_DIR/report.html for an evaluated run and return its path.

    Figures missing from RUN_DIR/figures are drawn first (with ``seed``). Raises InputError if
    the run has not been evaluated (no evaluation.json) and OutputExistsError if the report
    exists and ``overwrite`` is false.
    """
    from galaxyvae.figures import make_run_figures, missing_figures

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory")
    if not (run_dir / "evaluation.json").is_file():
        raise InputError(f"{run_dir}: the run has not been evaluated (no evaluation.json); "
                         f"run `galaxyvae evaluate {run_dir}` first")
    out = check_writable(run_dir / REPORT_NAME, overwrite)
    missing = missing_figures(run_dir)
    if missing:
        log.info("report: drawing missing figures %s", ", ".join(missing))
        make_run_figures(run_dir, seed=seed, only=missing)
    write_text_atomic(out, render_report(run_dir))
    return out


def render_report(run_dir: str | Path) -> str:
    """The report of ``run_dir`` as one HTML string (figures embedded, nothing external)."""
    from galaxyvae.figures import FIGURES

    run_dir = Path(run_dir)
    evaluation = read_json(run_dir / "evaluation.json")
    sections = [
        ("results", "Held-out results", results_section(run_dir, evaluation)),
        ("figures", "Figures", figures_section(run_dir / "figures", FIGURES)),
        ("training", "Training", training_section(run_dir)),
        ("config", "Configuration", key_value_table(read_json(run_dir / "config.json", required=False))),
        ("data", "Data provenance", key_value_table(read_json(run_dir / "data.json", required=False))),
        ("versions", "Library versions", key_value_table(read_json(run_dir / "versions.json", required=False))),
    ]
    timings = pipeline_timings(run_dir)
    if timings:
        sections.append(("pipeline", "Reproduction timings", timings))
    nav = " ".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title, _ in sections)
    body = "\n".join(f'<h2 id="{key}">{html.escape(title)}</h2>\n{content}' for key, title, content in sections)
    title = f"galaxyvae report: {run_dir.resolve().name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p class=\"subtitle\">Run directory <code>{html.escape(str(run_dir.resolve()))}</code>; "
        f"report written {html.escape(utc_now())} by galaxyvae {html.escape(__version__)}. "
        "A deep generative model of galaxy images after Regier, McAuliffe &amp; Prabhat.</p>\n"
        f"<nav>{nav}</nav>\n{headline(evaluation)}\n{body}\n</body>\n</html>\n"
    )


# --- sections --------------------------------------------------------------------------------

def headline(evaluation: dict) -> str:
    """One sentence with the paper's two numbers and ours against the Gaussian fit."""
    gaussian = evaluation.get("baselines", {}).get("gaussian")
    n = evaluation.get("n_images", "?")
    if not gaussian:
        return f'<p class="headline">Evaluated on {html.escape(str(n))} held-out images.</p>'
    paper = {**PAPER, **evaluation.get("paper", {})}
    return (
        f'<p class="headline">On <b>{html.escape(str(n))}</b> held-out images the VAE reconstruction has '
        f'lower pixel MSE than the Gaussian fit on <b>{percent(gaussian.get("mse_win_fraction"))}</b> of them '
        f'(paper: {percent(paper["mse_win_fraction"])}), and gives the pixels higher likelihood than the fit '
        f'with its best noise level on <b>{percent(gaussian.get("likelihood_win_fraction"))}</b> '
        f'(paper: {percent(paper["likelihood_win_fraction"])}).{refined_headline(evaluation)}</p>'
    )


def refined_headline(evaluation: dict) -> str:
    """With per-image latent refinement in evaluation.json, one more sentence: its two numbers."""
    refined = evaluation.get("refined") or {}
    gaussian = refined.get("baselines", {}).get("gaussian")
    if not gaussian:
        return ""
    return (f' With each image\'s z refined for its posterior ({html.escape(str(refined.get("steps", "?")))} '
            f'optimiser steps), f_mu(z*) wins on {percent(gaussian.get("mse_win_fraction"))} (MSE) and '
            f'{percent(gaussian.get("likelihood_win_fraction"))} (likelihood); the numbers above are the '
            "paper's amortised f_mu(g_mu(x)).")


def results_section(run_dir: Path, evaluation: dict) -> str:
    """table.md as ``galaxyvae evaluate`` wrote it (the paper-shaped table with the paper's numbers
    beside ours, and the model's own scores), rendered as HTML; built from evaluation.json if
    table.md is missing. Then the settings of the evaluation."""
    table_md = run_dir / "table.md"
    if table_md.is_file():
        parts = [markdown_to_html(table_md.read_text(encoding="utf-8"))]
    else:
        parts = ["<h3>Against the parametric fits (the paper's table)</h3>", comparison_table(evaluation),
                 "<h3>The model's own scores</h3>", model_table(evaluation)]
    settings = {k: v for k, v in evaluation.items() if k in EVALUATION_SETTINGS}
    if settings:
        parts += ["<h3>Evaluation settings</h3>", key_value_table(settings)]
    return "\n".join(parts)


def comparison_table(evaluation: dict) -> str:
    """Win fractions (with 95% intervals), mean and median MSE per baseline, the paper beside ours."""
    from galaxyvae.figures import BASELINE_LABELS

    if evaluation.get("refined"):
        return refined_comparison_table(evaluation)
    baselines = evaluation.get("baselines", {})
    paper = {**PAPER, **evaluation.get("paper", {})}
    vae = evaluation.get("vae", {})
    header = ["", "paper: VAE vs Gaussian fit"] + [f"ours: VAE vs {BASELINE_LABELS.get(b, b)} fit"
                                                   for b in baselines]
    rows = [
        ["images where the VAE has lower pixel MSE", percent(paper["mse_win_fraction"])]
        + [with_interval(s.get("mse_win_fraction"), s.get("mse_win_ci95")) for s in baselines.values()],
        ["images where the VAE gives higher likelihood than N(x-hat, sigma^2 I) for every sigma",
         percent(paper["likelihood_win_fraction"])]
        + [with_interval(s.get("likelihood_win_fraction"), s.get("likelihood_win_ci95"))
           for s in baselines.values()],
        ["mean MSE of the fit (VAE: " + number(vae.get("mean_mse")) + ")", "—"]
        + [number(s.get("mean_mse")) for s in baselines.values()],
        ["median MSE of the fit (VAE: " + number(vae.get("median_mse")) + ")", "—"]
        + [number(s.get("median_mse")) for s in baselines.values()],
        ["fits that converged", "—"] + [percent(s.get("fit_converged_fraction")) for s in baselines.values()],
    ]
    note = (f"<p>{html.escape(str(evaluation.get('n_images', '?')))} held-out images; 95% bootstrap intervals "
            "in brackets. MSE is the mean over pixels of the squared residual, in squared data units; the VAE "
            "reconstruction is f_mu(g_mu(x)).</p>")
    return html_table(header, rows) + note


def refined_comparison_table(evaluation: dict) -> str:
    """The win fractions of the amortised f_mu(g_mu(x)) (the paper's definition) and of the
    refined f_mu(z*) side by side, per baseline, with the paper's numbers."""
    from galaxyvae.figures import BASELINE_LABELS

    baselines = evaluation.get("baselines", {})
    refined = evaluation["refined"]
    paper = {**PAPER, **evaluation.get("paper", {})}
    header = ["", "paper: VAE vs Gaussian fit"]
    for name in baselines:
        label = BASELINE_LABELS.get(name, name)
        header += [f"ours vs {label} fit: amortised f_mu(g_mu(x))", f"ours vs {label} fit: refined f_mu(z*)"]
    pairs = [(s, refined.get("baselines", {}).get(name, {})) for name, s in baselines.items()]
    rows = [
        [text, percent(paper[f"{kind}_win_fraction"])]
        + [with_interval(s.get(f"{kind}_win_fraction"), s.get(f"{kind}_win_ci95")) for pair in pairs for s in pair]
        for kind, text in (("mse", "images where the VAE has lower pixel MSE"),
                           ("likelihood", "images where the VAE gives higher likelihood than N(x-hat, sigma^2 I) "
                                          "for every sigma"))
    ]
    for key, text, show in (("mean_mse", "mean MSE of the fit", number),
                            ("median_mse", "median MSE of the fit", number),
                            ("fit_converged_fraction", "fits that converged", percent)):
        rows.append([text, "—"] + [cell for s, _ in pairs for cell in (show(s.get(key)), "(same fit)")])
    vae, better = evaluation.get("vae", {}), refined.get("vae", {})
    note = (f"<p>{html.escape(str(evaluation.get('n_images', '?')))} held-out images; 95% bootstrap intervals in "
            "brackets. Amortised: f_mu(g_mu(x)), the paper's definition. Refined: f_mu(z*), z* from "
            f"{html.escape(str(refined.get('steps', '?')))} steps of Adam (learning rate "
            f"{html.escape(str(refined.get('learning_rate', '?')))}) on log N(x; f_mu(z), f_sigma(z)) + "
            "log N(z; 0, I) starting at g_mu(x). Mean / median MSE of the VAE: amortised "
            f"{number(vae.get('mean_mse'))} / {number(vae.get('median_mse'))}, refined "
            f"{number(better.get('mean_mse'))} / {number(better.get('median_mse'))} (squared data units).</p>")
    return html_table(header, rows) + note


def model_table(evaluation: dict) -> str:
    """ELBO and importance-weighted log p(x) (nats per image, bits per pixel) and the calibration of f_sigma."""
    vae = evaluation.get("vae", {})
    header = ["quantity", "value", "meaning"]
    rows = [
        ["ELBO", f"{number(vae.get('elbo_nats'))} nats per image",
         "evidence lower bound, mean over held-out images"],
        ["ELBO", f"{number(vae.get('elbo_bits_per_pixel'))} bits per pixel", "the same, per pixel, in bits"],
        ["log p(x), importance weighted", f"{number(vae.get('log_px_iw_nats'))} nats per image",
         "importance-weighted estimate of the marginal likelihood (tighter than the ELBO)"],
        ["log p(x), importance weighted", f"{number(vae.get('log_px_iw_bits_per_pixel'))} bits per pixel",
         "the same, per pixel, in bits"],
        ["residuals within 1 predicted s.d.", percent(vae.get("calibration_within_1sigma")),
         "fraction of pixels with |x - f_mu| < sqrt(f_sigma); 68.3% if f_sigma is calibrated"],
        ["residuals within 2 predicted s.d.", percent(vae.get("calibration_within_2sigma")),
         "the same within 2 s.d.; 95.4% if calibrated"],
    ]
    return html_table(header, rows)


def figures_section(folder: Path, specs) -> str:
    """Every figure in ``folder`` named in ``specs`` (FigureSpec), embedded with its caption."""
    parts = []
    for number_, spec in enumerate((s for s in specs if (folder / s.name).is_file()), start=1):
        data = base64.b64encode((folder / spec.name).read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="{html.escape(spec.name)}">\n<img alt="{html.escape(spec.title)}" '
            f'src="data:image/png;base64,{data}">\n<figcaption><b>Figure {number_}. '
            f"{html.escape(spec.title)}.</b> {html.escape(spec.caption)}</figcaption>\n</figure>"
        )
    return "\n".join(parts) if parts else "<p>No figures have been drawn for this run.</p>"


def training_section(run_dir: Path) -> str:
    """Epochs, the best validation ELBO (and the epoch of best.pt when chosen by MSE) and the
    training time, from log.csv and config.json."""
    path = run_dir / "log.csv"
    if not path.is_file():
        return "<p>No training log (log.csv) in the run directory.</p>"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return "<p>The training log (log.csv) is empty.</p>"
    column = "validation_elbo" if "validation_elbo" in rows[0] else "held_out_elbo"
    elbo = [float(r.get(column, "nan")) for r in rows]
    best = max(range(len(rows)), key=lambda i: elbo[i] if elbo[i] == elbo[i] else float("-inf"))
    seconds = sum(float(r.get("seconds", 0) or 0) for r in rows)
    speed = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    pairs = {
        "epochs trained": rows[-1].get("epoch", len(rows)),
        "gradient steps": rows[-1].get("step", "?"),
        "final training loss (nats per image)": number(float(rows[-1].get("train_loss", "nan"))),
        f"best {column[:-5].replace('_', '-')} ELBO (nats per image)": f"{number(elbo[best])} at epoch {rows[best].get('epoch')}",
        "training time": f"{seconds / 60:.1f} min",
        "training speed (median images per second)": number(sorted(speed)[len(speed) // 2]) if speed else "?",
    }
    if (read_json(run_dir / "config.json", required=False) or {}).get("checkpoint_metric") == "mse":
        mse = [float(r.get("validation_mse") or "nan") for r in rows]
        chosen = min(range(len(rows)), key=lambda i: mse[i] if mse[i] == mse[i] else float("inf"))
        pairs["best.pt (lowest validation MSE of f_\u03bc(g_\u03bc(x)))"] = (
            f"{number(mse[chosen])} at epoch {rows[chosen].get('epoch')}")
    return key_value_table(pairs)


def pipeline_timings(run_dir: Path) -> str:
    """Stage timings from OUT/reproduce.json when the run was made by ``galaxyvae reproduce``."""
    path = run_dir.parent / "reproduce.json"
    record = read_json(path, required=False)
    if not record or Path(record.get("run_dir", "")).resolve() != run_dir.resolve():
        return ""
    stages = record.get("stages", {})
    order = [name for name in PIPELINE_STAGES if name in stages] + sorted(set(stages) - set(PIPELINE_STAGES))
    rows = [[name, _seconds(stages[name].get("seconds")), stages[name].get("status", "")] for name in order]
    rows.append(["all stages", _seconds(record.get("total_seconds")), ""])
    invocations = record.get("invocations", [])
    settings = {k: v for k, v in record.items() if k not in ("stages", "invocations", "versions", "total_seconds")}
    settings["invocations"] = len(invocations)
    return html_table(["stage", "time", "status"], rows) + key_value_table(settings)


def _seconds(value) -> str:
    if value is None:
        return "?"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


# --- HTML helpers ----------------------------------------------------------------------------

def html_table(header: list[str], rows: list[list]) -> str:
    """An HTML table; cells are escaped, and cells that look numeric are right-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _cell(value) -> str:
    text = str(value)
    numeric = _is_number(re.sub(r"%?( \(.*\))?$", "", text.strip()).replace(",", ""))
    return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def key_value_table(mapping: dict | None) -> str:
    """A two-column table of a nested mapping, keys joined with dots, lists as JSON."""
    if not mapping:
        return "<p>Not recorded.</p>"
    return html_table(["setting", "value"], [[k, v] for k, v in flatten(mapping).items()])


def flatten(mapping: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists and other values become their JSON text."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def markdown_to_html(text: str) -> str:
    """Render the Markdown that table.md uses: headings, pipe tables, bullet lists, paragraphs,
    with **bold**, *italic* and `code` inline. Everything is escaped first."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                table.append(lines[i].strip())
                i += 1
            blocks.append(_markdown_table(table))
        elif line.startswith("#"):
            level = min(max(len(line) - len(line.lstrip("#")) + 1, 3), 6)  # below the page's own h2
            blocks.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("|", "#", "- ", "* ")):
                paragraph.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(blocks)


def _markdown_table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rule = next((r for r in rows if r and all(re.fullmatch(r":?-{2,}:?", c) for c in r)), [])
    rows = [r for r in rows if r is not rule]
    numeric = [cell.endswith(":") for cell in rule]
    header, body = rows[0], rows[1:]
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    cells = "\n".join(
        "<tr>" + "".join(
            f'<td class="num">{_inline(c)}</td>' if i < len(numeric) and numeric[i] else f"<td>{_inline(c)}</td>"
            for i, c in enumerate(row)) + "</tr>"
        for row in body)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{cells}\n</tbody>\n</table>"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<i>\1</i>", text)


# --- values ----------------------------------------------------------------------------------

def read_json(path: Path, required: bool = True):
    """Parse a JSON file of the run; a missing optional file gives None, a broken one InputError."""
    if not path.is_file():
        if required:
            raise InputError(f"{path}: no such file")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def percent(value) -> str:
    """0.9712 -> '97.1%'; None or NaN -> '?'."""
    if value is None or value != value:
        return "?"
    return f"{100 * float(value):.1f}%"


def with_interval(value, interval) -> str:
    """'97.1% (96.0–98.1%)' from a fraction and a [lo, hi] interval of fractions."""
    if not interval or len(interval) != 2:
        return percent(value)
    return f"{percent(value)} ({100 * interval[0]:.1f}–{100 * interval[1]:.1f}%)"


def number(value) -> str:
    """Four significant figures (thousands separated, no exponent between 1e-3 and 1e7), or '?'."""
    if value is None or value != value:
        return "?"
    value = float(value)
    if 1e3 <= abs(value) < 1e7:
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:,.1f}"
    return f"{value:.4g}"
