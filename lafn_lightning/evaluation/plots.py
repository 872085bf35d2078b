"""Analysis figures: the located neurons (paper Figures 1 and 4) and the scores of a results file.

    counts = factual_neuron_counts(model, adapter, tokenizer, corpora, beta=0.3)
    plot_layer_counts(counts, "factual_neurons_per_layer.png")
    plot_language_scores(language_scores(json.loads(Path("runs/x/results.json").read_text())), "scores.png")

``lafn plots`` (:mod:`lafn_lightning.api.analysis`) writes both neuron figures and their numbers, or
with ``--results`` the per-language score bars of an evaluation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..editing.locate import agnostic_neurons, count_activations, language_neurons
from .metrics import METRICS
from .protocol import SETTINGS

__all__ = [
    "neuron_set_difference",
    "difference_matrix",
    "factual_neuron_counts",
    "plot_layer_counts",
    "plot_difference_heatmap",
    "METRICS",
    "language_scores",
    "plot_language_scores",
]


def neuron_set_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``1 - (|A∩B|/|A| + |A∩B|/|B|) / 2`` for two boolean neuron masks of one layer (paper Fig. 4).

    Two empty sets are identical (0.0); an empty and a non-empty set are fully different (1.0).
    """
    a, b = a.bool().reshape(-1), b.bool().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"masks of different sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 and nb == 0:
        return 0.0
    if na == 0 or nb == 0:
        return 1.0
    inter = int((a & b).sum())
    return 1.0 - (inter / na + inter / nb) / 2.0


def difference_matrix(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise :func:`neuron_set_difference` of ``masks`` (symmetric, zero diagonal), float64."""
    n = len(masks)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = neuron_set_difference(masks[i], masks[j])
    return out


@torch.no_grad()
def factual_neuron_counts(model, adapter, tokenizer, corpora: Sequence[Mapping[str, list[str]]], *, beta: float,
                          layers: Sequence[int] | None = None, progress: bool = False) -> dict:
    """Locate factual neurons in ``layers`` (default: all) for each corpus (one per group:
    language -> texts). Returns ``{"layers", "languages", "per_language": {lang: [mean |D_l| per
    layer]}, "intersection": [mean |D_G| per layer], "masks": [D_G bool [layers, d_ff] per
    corpus]}``; means are over the corpora that hold the language."""
    layers = list(range(adapter.n_layers)) if layers is None else [int(i) for i in layers]
    languages: list[str] = []
    for c in corpora:
        languages += [lang for lang in c if lang not in languages]
    sums = {lang: torch.zeros(len(layers), dtype=torch.float64) for lang in languages}
    seen = {lang: 0 for lang in languages}
    inter = torch.zeros(len(layers), dtype=torch.float64)
    masks = []
    it = corpora
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(corpora, desc="locating", unit="group")
    for corpus in it:
        counts = {lang: count_activations(model, adapter, layers, tokenizer, texts) for lang, texts in corpus.items()}
        for lang, c in counts.items():
            sums[lang] += language_neurons(c, beta).sum(-1).double()
            seen[lang] += 1
        mask = agnostic_neurons(counts, beta)
        inter += mask.sum(-1).double()
        masks.append(mask)
    n = max(len(corpora), 1)
    return {
        "layers": layers,
        "languages": languages,
        "per_language": {lang: (sums[lang] / max(seen[lang], 1)).tolist() for lang in languages},
        "intersection": (inter / n).tolist(),
        "masks": masks,
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_counts(counts: Mapping, path: str | Path | None = None, *, title: str = "", d_ff: int | None = None):
    """Figure 1: per-layer factual-neuron counts per language (thin lines) and their
    intersection (thick black line). Saves a PNG when ``path`` is given; returns the figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    layers = counts["layers"]
    cmap = plt.get_cmap("tab20" if len(counts["languages"]) > 10 else "tab10")
    for k, lang in enumerate(counts["languages"]):
        ax.plot(layers, counts["per_language"][lang], marker="o", ms=3, lw=1.2, color=cmap(k % cmap.N), label=lang)
    ax.plot(layers, counts["intersection"], marker="s", ms=4, lw=2.6, color="black", label="intersection (LAFNs)")
    ax.set_xlabel("layer")
    ax.set_ylabel("factual neurons (mean over groups)" + (f", of d_ff={d_ff}" if d_ff else ""))
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(ncol=2 if len(counts["languages"]) > 8 else 1, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    ax.set_title(title or "Factual neurons per layer", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def plot_difference_heatmap(matrix: torch.Tensor, labels: Sequence[str], path: str | Path | None = None, *,
                            title: str = ""):
    """Figure 4: heatmap of the pairwise neuron-set difference (0 = same set, 1 = disjoint)."""
    plt = _pyplot()
    n = len(labels)
    size = min(4.5 + 0.28 * n, 16)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=120)
    im = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    if n <= 40:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    v = float(matrix[i, j])
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
    else:
        ax.set_xlabel("group")
        ax.set_ylabel("group")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=r"$1 - (|D_a \cap D_b|/|D_a| + |D_a \cap D_b|/|D_b|)\,/\,2$")
    ax.set_title(title or "Neuron-set difference between groups", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def language_scores(results: Mapping[str, Any], setting: str | None = None, view: str = "teacher_forced",
                    score: str = "f1") -> dict:
    """The per-language scores of one setting of a results file (``lafn evaluate --output``):
    ``{"setting", "view", "score", "languages": [..., "avg"], "metrics": {metric: [one value per
    language]}}``, NaN where the file has no sample. ``setting`` defaults to all_cached where the
    file has it, else edit_one_test_one; ``view`` is teacher_forced or generation; ``score`` f1 or em.

        scores = language_scores(json.loads(Path("runs/x/results.json").read_text()), score="em")
    """
    block = results if view == "teacher_forced" else results.get(view)
    if not isinstance(block, Mapping):
        raise ValueError(f"the results file has no {view!r} view (evaluated with --generation false?)")
    setting = setting or next((s for s in ("all_cached", "edit_one_test_one") if s in block), None)
    if setting not in block:
        raise ValueError(f"the results file has no setting {setting!r}; it has {[s for s in SETTINGS if s in block]}")
    table = block[setting]
    metrics = [m for m in METRICS if m in table]
    languages = [lang for lang in (results.get("meta", {}).get("languages") or table[metrics[0]]) if lang != "avg"]
    languages.append("avg")

    def value(metric: str, lang: str) -> float:
        v = table[metric].get(lang, {}).get(score)
        return float("nan") if v is None else float(v)

    return {"setting": setting, "view": view, "score": score, "languages": languages,
            "metrics": {m: [value(m, lang) for lang in languages] for m in metrics}}


def plot_language_scores(scores: Mapping[str, Any], path: str | Path | None = None, *, title: str = ""):
    """Grouped bars: per language (and the average, last), one bar per metric, from
    :func:`language_scores`. A score without samples (NaN) draws no bar. Saves a PNG when ``path``
    is given; returns the figure."""
    plt = _pyplot()
    languages, metrics = scores["languages"], scores["metrics"]
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=100)
    width = 0.84 / max(len(metrics), 1)
    colors = plt.get_cmap("tab10")
    for k, (metric, values) in enumerate(metrics.items()):
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(languages))]
        ax.bar(xs, values, width, label=metric.capitalize(), color=colors(k))
    ax.set_xticks(range(len(languages)))
    ax.set_xticklabels(languages)
    ax.set_xlim(-0.6, len(languages) - 0.4)
    if languages and languages[-1] == "avg":
        ax.axvline(len(languages) - 1.5, color="grey", lw=0.8, ls=":")
    finite = [v for values in metrics.values() for v in values if not math.isnan(v)]
    ax.set_ylim(0, max(100.0, *finite) if finite else 100.0)
    ax.set_ylabel(f"{scores['score'].upper()} (x100)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(ncol=len(metrics), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title or f"{scores['setting']}, {scores['view']}", fontsize=10, pad=22)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
