"""How right the backend has been on a project: per attribute, confirmations, pre-annotations kept
as is, the current model's cross-validated scores on the confirmed labels, and their history.

    report = build(redis, "12")       # JSON-able dict (served at /report?project=12)
    text(report), render_html(report) # `subdisc report --project 12`, /report.html?project=12

Scores come from the last refit (the labels, folds and choice it made); `refit_running` says whether
one is under way (its figures will replace these), `refit_queued` whether newer confirmations are
waiting for the next one. "Accepted as is" is counted on every annotation against what we had
pre-annotated on its task when the annotation arrived.
"""
from __future__ import annotations

import html
from collections import Counter

from backend.confirmations import acceptance
from backend.labeling_config import parse
from backend.attributes.report import json_safe, figure_png, format_html, format_text, pct
from backend.state import ProjectState


def projects(redis) -> list[dict]:
    return [{"project": p, "report": f"/report?project={p}", "page": f"/report.html?project={p}"}
            for p in ProjectState.projects(redis)]


def build(redis, project) -> dict:
    st = ProjectState(redis, project)
    settings = st.settings()
    if settings is None:
        raise LookupError(f"project {st.id} is unknown here: Label Studio has not called /setup for it")
    config = parse(settings["label_config"])
    stored = st.load_model()
    meta = stored[1] if stored is not None else {}
    entries = st.annotations()
    accepted = acceptance(entries, config)
    history = st.history()
    attributes = {}
    for attribute in config.attributes:
        name = attribute.name
        info = meta.get("info", {}).get(name, {})
        sel = info.get("selection") or {}
        scores = sel.get("scores") or {}
        shown, kept = accepted[name]["shown"], accepted[name]["accepted"]
        attributes[name] = {
            "values": list(attribute.values), "per_region": attribute.per_region,
            "status": info.get("status", "no model yet"),
            "confirmations": info.get("confirmations", {}),
            "confirmed": sum(info.get("confirmations", {}).values()),
            "shown": shown, "accepted": kept, "accepted_rate": kept / shown if shown else None,
            "algo": info.get("algo"), "k": info.get("k"), "names": info.get("names"),
            "chosen": sel.get("chosen"), "candidates": sel.get("cv"), "folds": sel.get("folds"),
            "accuracy": scores.get("accuracy"), "balanced_accuracy": scores.get("balanced_accuracy"),
            "majority_baseline": scores.get("majority_baseline"), "per_value": scores.get("per_value"),
            "confusion": scores.get("confusion"), "confusion_values": scores.get("values"),
            "scored_faces": scores.get("n"), "prior_accuracy": info.get("prior_accuracy"),
            "view": info.get("view"),
            # Of the project's faces not confirmed yet, the share given a value now.
            "coverage": info.get("coverage"),
            # Held out (nested CV): how often a value above the threshold was right, and the
            # share of held-out faces above it.
            "shown_accuracy": (info.get("gate") or {}).get("shown_accuracy"),
            "shown_coverage_cv": (info.get("gate") or {}).get("coverage"),
            "threshold": (info.get("gate") or {}).get("threshold"),
            "history": [{"at": h["at"], "version": h["version"], **h["attributes"][name]}
                        for h in history if name in h.get("attributes", {})],
        }
    errors = st.errors()
    return json_safe({
        "project": st.id, "model_version": meta.get("version"), "fitted": meta.get("fitted"),
        "faces": meta.get("n_faces", 0), "tasks": redis.hlen(st.key("tasks")),
        "annotations": len(entries), "label_stats": meta.get("label_stats", {}),
        "errors": dict(Counter(e["error"] for e in errors.values())),
        "error_examples": error_examples(errors),
        "refit_running": st.refit_running(), "refit_queued": st.refit_queued(),
        "refits": len(history), "attributes": attributes})


def error_examples(errors: dict[str, dict], per_kind: int = 5) -> dict[str, list[dict]]:
    """{error kind: its newest `per_kind` tasks as {"task", "message"}}: which photos to look at."""
    out: dict[str, list[dict]] = {}
    for task, e in sorted(errors.items(), key=lambda kv: kv[1].get("at", 0), reverse=True):
        examples = out.setdefault(e["error"], [])
        if len(examples) < per_kind:
            examples.append({"task": task, "message": e.get("message")})
    return out


def errors_table(report: dict):
    header = ["problem", "tasks", "for example (newest first)"]
    rows = [[kind, str(n), "; ".join(f"task {x['task']}: {x['message']}"
                                     for x in report["error_examples"].get(kind, []))]
            for kind, n in sorted(report["errors"].items(), key=lambda kv: -kv[1])]
    return header, rows


def _named(report: dict):
    return [(n, a) for n, a in report["attributes"].items() if a["confusion"]]


def summary_table(report: dict):
    header = ["attribute", "status", "confirmed", "accepted as is", "accuracy (CV)", "balanced",
              "majority", "shown: accuracy (CV)", "coverage", "model", "per value"]
    rows = []
    for name, a in report["attributes"].items():
        accepted = f"{a['accepted']}/{a['shown']} ({pct(a['accepted_rate'])})" if a["shown"] else "-"
        model = "-"
        if a["algo"] == "committee" and a["chosen"]:
            model = "mean of " + ", ".join(a["chosen"].split(":", 1)[1].split("+"))
        elif a["algo"]:
            model = a["algo"] + (f" k={a['k']}" if a["k"] else "") + (f" on {a['view']}" if a["view"] else "")
        per = ", ".join(f"{v} {pct(x)}" for v, x in (a["per_value"] or {}).items()) or "-"
        shown = pct(a["shown_accuracy"]) if a["status"] == "shown" else "-"
        rows.append([name, a["status"], str(a["confirmed"]), accepted, pct(a["accuracy"]),
                     pct(a["balanced_accuracy"]), pct(a["majority_baseline"]), shown,
                     pct(a["coverage"]), model, per])
    return header, rows


def history_table(report: dict):
    header = ["refit", "version", "attribute", "status", "confirmed", "accuracy (CV)",
              "shown: accuracy (CV)", "coverage", "model", "accepted as is"]
    rows = []
    for name, a in report["attributes"].items():
        for i, h in enumerate(a["history"], start=1):
            model = (h["algo"] + (f" k={h['k']}" if h.get("k") else "")) if h.get("algo") else "-"
            rows.append([str(i), h["version"], name, str(h.get("status", "-")), str(h["confirmations"]),
                         pct(h["accuracy"]), pct(h.get("shown_accuracy")), pct(h.get("coverage")),
                         model, f"{h['accepted']}/{h['shown']}"])
    return header, rows


def confusion_table(a: dict):
    values = a["confusion_values"]
    header = ["true \\ predicted", *values]
    return header, [[v, *map(str, row)] for v, row in zip(values, a["confusion"])]


def refits_pending(report: dict) -> str:
    """What will change these figures: "a refit is running", "a refit is queued", both, or ""."""
    running, queued = report.get("refit_running"), report.get("refit_queued")
    if running and queued:
        return "a refit is running, another is queued"
    return "a refit is running" if running else "a refit is queued" if queued else ""


def text(report: dict) -> str:
    parts = [f"project {report['project']}: model {report['model_version'] or '-'}, "
             f"{report['faces']} faces in {report['tasks']} tasks, {report['annotations']} annotations"
             + (f" ({pending})" if (pending := refits_pending(report)) else ""),
             "", format_text(summary_table(report))]
    for name, a in _named(report):
        parts += ["", f"{name}: confusion of held-out predictions ({a['folds']} folds, "
                      f"{a['scored_faces']} faces)", format_text(confusion_table(a))]
    if report["refits"]:
        parts += ["", "history", format_text(history_table(report))]
    if report["errors"]:
        parts += ["", "tasks without a full prediction", format_text(errors_table(report))]
    return "\n".join(parts)


def plot_history(report: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {n: a["history"] for n, a in report["attributes"].items() if a["history"]}
    if not series:
        return None
    fig, (acc, conf) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, hist in series.items():
        xs = list(range(1, len(hist) + 1))
        acc.plot(xs, [h["accuracy"] if h["accuracy"] is not None else float("nan") for h in hist],
                 marker="o", label=name)
        conf.plot(xs, [h["confirmations"] for h in hist], marker="o", label=name)
    acc.set_ylim(0, 1.02)
    acc.set_xlabel("refit")
    acc.set_ylabel("accuracy (cross-validated)")
    conf.set_xlabel("refit")
    conf.set_ylabel("confirmed faces")
    acc.legend(fontsize=8)
    return figure_png(fig)


def plot_confusions(report: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    named = _named(report)
    if not named:
        return None
    fig, axes = plt.subplots(1, len(named), figsize=(2.8 * len(named), 2.6), squeeze=False)
    for ax, (name, a) in zip(axes[0], named):
        m = np.asarray(a["confusion"])
        ax.imshow(m, cmap="Blues")
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(a["confusion_values"])), a["confusion_values"], fontsize=7)
        ax.set_yticks(range(len(a["confusion_values"])), a["confusion_values"], fontsize=7)
        ax.set_title(f"{name} ({pct(a['accuracy'])})", fontsize=9)
    fig.supxlabel("predicted (held out)")
    fig.supylabel("confirmed")
    return figure_png(fig)


def render_html(report: dict) -> str:
    title = f"subdisc: project {report['project']}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>Model {html.escape(str(report['model_version']))}: {report['faces']} faces in "
            f"{report['tasks']} tasks, {report['annotations']} annotations"
            + (f", {pending}" if (pending := refits_pending(report)) else "") + ".</p>",
            format_html(summary_table(report))]
    for caption, png in (("accuracy and confirmations, refit after refit", plot_history(report)),
                         ("current model: held-out predictions vs confirmations", plot_confusions(report))):
        if png:
            body.append(f"<figure><img src='data:image/png;base64,{png}' alt='{caption}'>"
                        f"<figcaption>{caption}</figcaption></figure>")
    if report["refits"]:
        body += ["<h2>History</h2>", format_html(history_table(report))]
    if report["errors"]:
        body += ["<h2>Tasks without a full prediction</h2>", format_html(errors_table(report))]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def index_html(items: list[dict]) -> str:
    links = "".join(f"<li><a href='{html.escape(i['page'])}'>project {html.escape(i['project'])}</a></li>"
                    for i in items) or "<li>no project yet</li>"
    return f"<!doctype html><html><body><h1>subdisc projects</h1><ul>{links}</ul></body></html>"
