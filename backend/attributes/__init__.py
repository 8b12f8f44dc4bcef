"""The attribute-learning side of subdisc: from face vectors (and views) and confirmed labels to
per-face values, scores and an order to label in.

    from backend.attributes.project_model import Clusterings, fit_project

Parts: clustering (clusterers), scoring (names, accuracies), centroids (saved models), selection
(nested cross-validation), project_model (a project's per-attribute models), study / report (the
seed study's experiments). The Label Studio side (backend/model.py and friends) calls into this
package; nothing here imports it.
"""
