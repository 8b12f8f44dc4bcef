"""Reports of a study: text tables (the CLI prints them), Markdown, JSON, and an HTML page with plots.

    paths = write_report(result, "out/")   # {"markdown": ..., "json": ..., "html": ...}

Tables follow the seed study's layout: one row per attribute value, one column per run, then the
average; every accuracy is shown beside the majority-class baseline of the same rows and the
balanced accuracy. Plots are matplotlib figures (Agg backend) embedded in the HTML as base64 PNGs.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from backend.attributes.scoring import Scores

Table = tuple[list[str], list[list[str]]]


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


# --- tables ------------------------------------------------------------------------------------

def extra_table(extra) -> Table:
    """Table 1: k, attribute=value, accuracy per run, average; then per attribute the overall
    accuracy, the balanced accuracy and the majority baseline of the same rows."""
    header = ["k", "cluster content"] + [f"run {i + 1}" for i in range(extra.runs)] + [
        "average", "balanced", "majority"]
    rows = []
    for k in extra.ks:
        for a in extra.attributes:
            runs = extra.scores[k][a]
            summary = extra.summaries[k][a]
            for v in runs[0].values:
                rows.append([str(k), f"{a}={v}"] + [pct(s.per_value.get(v)) for s in runs]
                            + [pct(summary.per_value.get(v)), "", ""])
            rows.append([str(k), f"{a} (all {summary.n})"] + [pct(s.accuracy) for s in runs]
                        + [pct(summary.accuracy), pct(summary.balanced_accuracy),
                           pct(summary.majority_baseline)])
    return header, rows


def hierarchy_table(levels) -> Table:
    attrs = list(levels[0].ami) if levels else []
    header = ["k", "follows", "AMI"] + [f"AMI {a}" for a in attrs] + [f"purity {a}" for a in attrs]
    rows = [[str(h.k), " x ".join(h.follows) or "-", f"{h.follows_ami:.2f}"]
            + [f"{h.ami[a]:.2f}" for a in attrs] + [pct(h.purity[a]) for a in attrs] for h in levels]
    return header, rows


def ceiling_table(ceilings: dict[str, Scores], extra=None) -> Table:
    """Supervised ceiling per attribute, beside the best zero-shot average over k (if given)."""
    header = ["attribute", "n", "logreg 5-fold", "balanced", "majority"]
    if extra is not None:
        header += ["best clusters", "at k"]
    rows = []
    for a, s in ceilings.items():
        row = [a, str(s.n), pct(s.accuracy), pct(s.balanced_accuracy), pct(s.majority_baseline)]
        if extra is not None:
            k = max(extra.ks, key=lambda k: extra.summaries[k][a].accuracy)
            row += [pct(extra.summaries[k][a].accuracy), str(k)]
        rows.append(row)
    return header, rows


def intra_table(intra) -> Table:
    a, b = intra.pair
    header = ["identity", "n", a, b, "accuracy", "balanced", "majority"]
    rows = [[r.identity, str(r.n), str(r.counts[a]), str(r.counts[b]), pct(r.accuracy),
             pct(r.balanced_accuracy), pct(r.majority_baseline)] for r in intra.rows]
    if intra.rows:
        pooled = intra.pooled()
        rows.append([f"mean of {len(intra.rows)}", str(sum(r.n for r in intra.rows)),
                     str(sum(r.counts[a] for r in intra.rows)), str(sum(r.counts[b] for r in intra.rows)),
                     pct(intra.accuracy), pct(intra.balanced_accuracy), pct(intra.majority_baseline)])
        rows.append(["pooled (run 1)", str(pooled.n), "", "", pct(pooled.accuracy),
                     pct(pooled.balanced_accuracy), pct(pooled.majority_baseline)])
    return header, rows


def holdout_table(held) -> Table:
    """Figure 4: per attribute value, train and test accuracy for each algorithm."""
    algos = list(held.train)
    header = ["attribute", "value"] + [f"{g} {part}" for g in algos for part in ("train", "test")]
    rows = []
    attrs = list(held.train[algos[0]]) if algos else []
    for a in attrs:
        for v in held.train[algos[0]][a].values:
            rows.append([a, v] + [pct(getattr(held, part)[g][a].per_value.get(v))
                                  for g in algos for part in ("train", "test")])
        rows.append([a, "all"] + [pct(getattr(held, part)[g][a].accuracy)
                                  for g in algos for part in ("train", "test")])
        rows.append([a, "balanced"] + [pct(getattr(held, part)[g][a].balanced_accuracy)
                                       for g in algos for part in ("train", "test")])
        rows.append([a, "majority"] + [pct(getattr(held, part)[g][a].majority_baseline)
                                       for g in algos for part in ("train", "test")])
        rows.append([a, "chosen k"] + [str(held.chosen_k[g][a]) for g in algos for _ in range(2)])
    return header, rows


def efficiency_table(eff) -> Table:
    header = ["method"] + [f"n={n}" for n in eff.ns]
    rows = []
    for method in eff.curves:
        rows.append([method] + [f"{pct(eff.mean(method, n))} ({pct(eff.mean(method, n, 'balanced_accuracy'))})"
                                for n in eff.ns])
    rows.append(["majority"] + [pct(eff.mean(next(iter(eff.curves)), n, "majority_baseline"))
                                for n in eff.ns])
    return header, rows


def format_text(table: Table) -> str:
    header, rows = table
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_markdown(table: Table) -> str:
    header, rows = table
    esc = lambda c: str(c).replace("|", "\\|")
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def format_html(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(result) -> list[tuple[str, str, Table]]:
    """(title, explanation, table) for everything the study measured, in reading order."""
    out = []
    if result.extra is not None:
        e = result.extra
        out.append((f"Extra-class (Table 1): {e.algo}, preprocess {e.preprocess}, {e.n} faces",
                    "Recall per attribute value for each run, clusters named one-to-one when k equals "
                    "the number of values, by majority otherwise.", extra_table(e)))
        out.append(("Hierarchy: what each k follows",
                    "The attribute combination whose joint values match the clusters best (adjusted "
                    "mutual information), AMI and purity per attribute.", hierarchy_table(e.hierarchy)))
    if result.ceilings:
        out.append(("Supervised ceiling", "5-fold logistic regression on the same vectors and labels.",
                    ceiling_table(result.ceilings, result.extra)))
    if result.holdout is not None:
        h = result.holdout
        out.append((f"Held-out centroids (section 5, Figure 4): {h.n_train} train / {h.n_test} test",
                    "Clusters fitted and named on the training split (best k and run by training "
                    "accuracy), test faces classified by nearest centroid / most probable component.",
                    holdout_table(h)))
    for a, eff in result.efficiency.items():
        out.append((f"Label efficiency: {a}",
                    f"Accuracy (balanced) on all other faces after n random labelled faces, mean of "
                    f"{eff.draws} draws.", efficiency_table(eff)))
    for intra in result.intra:
        out.append((f"Intra-class (Tables 2-3): {intra.attribute} {intra.pair[0]} vs {intra.pair[1]}, "
                    f"view {intra.view}", "Per identity, k=2 clusters of its faces.", intra_table(intra)))
    return out


def text_report(result) -> str:
    parts = [f"{len(result.missing)} labelled photos had no usable face"] if result.missing else []
    for title, _, table in sections(result):
        parts.append(f"\n{title}\n{format_text(table)}")
    return "\n".join(parts)


# --- plots ------------------------------------------------------------------------------------

def figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG for an <img src="data:..."> (and the figure closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_accuracy(extra) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for a in extra.attributes:
        s = [extra.summaries[k][a] for k in extra.ks]
        line = ax.errorbar(extra.ks, [x.accuracy for x in s], yerr=[x.accuracy_std for x in s],
                           marker="o", capsize=3, label=a)
        ax.plot(extra.ks, [x.majority_baseline for x in s], ls=":", color=line[0].get_color())
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("accuracy (dotted: majority baseline)")
    ax.set_xticks(extra.ks)
    ax.set_ylim(0, 1.02)
    ax.legend()
    return figure_png(fig)


def plot_confusions(extra) -> str:
    import matplotlib.pyplot as plt

    ks, attrs = extra.ks, extra.attributes
    fig, axes = plt.subplots(len(ks), len(attrs), figsize=(2.8 * len(attrs), 2.8 * len(ks)), squeeze=False,
                             layout="constrained")
    for i, k in enumerate(ks):
        for j, a in enumerate(attrs):
            s = extra.scores[k][a][0]
            ax = axes[i][j]
            ax.imshow(s.confusion, cmap="Blues")
            for (r, c), v in np.ndenumerate(s.confusion):
                ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(s.values)), s.values, fontsize=7)
            ax.set_yticks(range(len(s.values)), s.values, fontsize=7)
            ax.set_title(f"k={k} {a} ({pct(s.accuracy)})", fontsize=8)
    fig.supxlabel("predicted (run 1)")
    fig.supylabel("true")
    return figure_png(fig)


def plot_projection(X, cluster_ids, labels: dict[str, np.ndarray], k: int) -> str:
    """2-D PCA of the vectors: coloured by cluster, then by each attribute's true value."""
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    P = PCA(2).fit_transform(np.asarray(X, np.float64))
    panels = [(f"clusters (k={k})", np.asarray(cluster_ids).astype(str))]
    panels += [(a, np.array([str(v) if v else "?" for v in y])) for a, y in labels.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False)
    for ax, (title, colour) in zip(axes[0], panels):
        for v in sorted(set(colour)):
            m = colour == v
            ax.scatter(P[m, 0], P[m, 1], s=6, alpha=0.7, label=v)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=2, loc="best")
    return figure_png(fig)


def plot_efficiency(eff) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in eff.curves:
        ax.plot(eff.ns, [eff.mean(method, n) for n in eff.ns], marker="o", label=method)
    ax.plot(eff.ns, [eff.mean(next(iter(eff.curves)), n, "majority_baseline") for n in eff.ns],
            ls=":", color="grey", label="majority")
    ax.set_xscale("log")
    ax.minorticks_off()  # else log-scale minor labels (3x10^0...) clutter the axis
    ax.set_xticks(eff.ns, [str(n) for n in eff.ns])
    ax.set_xlabel("labelled faces")
    ax.set_ylabel("accuracy on the rest")
    ax.set_title(eff.attribute)
    ax.legend(fontsize=7)
    return figure_png(fig)


def plots(result) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for the HTML page."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (workers and CI have no display)
    out = []
    e = result.extra
    if e is not None:
        out.append(("Accuracy per k and attribute (mean and spread over runs)", plot_accuracy(e)))
        out.append(("Confusion matrices (run 1)", plot_confusions(e)))
        if result.X is not None and len(result.X) > 2:
            k = max(e.ks)
            out.append((f"2-D PCA projection, coloured by cluster (k={k}) and by label",
                        plot_projection(result.X, e.cluster_ids[k], result.labels, k)))
    for a, eff in result.efficiency.items():
        out.append((f"Label efficiency: {a}", plot_efficiency(eff)))
    return out


# --- files ------------------------------------------------------------------------------------

def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def json_safe(obj):
    """NaN is not JSON: write null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def markdown_report(result, title: str) -> str:
    parts = [f"# {title}", "", f"{result.n} labelled faces with a vector"
             + (f"; {len(result.missing)} photos without a usable face." if result.missing else ".")]
    for name, why, table in sections(result):
        parts += ["", f"## {name}", "", why, "", format_markdown(table)]
    return "\n".join(parts) + "\n"


def html_report(result, title: str) -> str:
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{result.n} labelled faces with a vector; {len(result.missing)} without a usable face.</p>"]
    for caption, png in plots(result):
        body.append(f"<figure><img src='data:image/png;base64,{png}' alt='{html.escape(caption)}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for name, why, table in sections(result):
        body += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(why)}</p>", format_html(table)]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,td:nth-child(2),th{text-align:left}figure{display:inline-block}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(result, out_dir, title: str = "subdisc study") -> dict[str, Path]:
    """Write study.md, study.json and study.html into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "study.md", "json": out / "study.json", "html": out / "study.html"}
    paths["markdown"].write_text(markdown_report(result, title))
    paths["json"].write_text(json.dumps(json_safe(result.to_dict()), indent=1, default=_json_default))
    paths["html"].write_text(html_report(result, title))
    return paths
