"""Analysis plots: the Figure-4 difference formula, per-layer factual-neuron counts, the command."""
import json

import pytest
import torch

from conftest import CONFIGS
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.backbone.ffn import adapter_for
from lafn_lightning.editing.locate import locate_group
from lafn_lightning.api import Settings, plots
from lafn_lightning.cli import main
from lafn_lightning.evaluation.plots import difference_matrix, factual_neuron_counts, neuron_set_difference

PNG = b"\x89PNG\r\n\x1a\n"


def mask(d, *ids):
    m = torch.zeros(d, dtype=torch.bool)
    m[list(ids)] = True
    return m


def test_neuron_set_difference_on_hand_made_sets():
    a, b = mask(10, 0, 1, 2, 3), mask(10, 2, 3, 4)
    # |A∩B| = 2: 1 - (2/4 + 2/3) / 2
    assert neuron_set_difference(a, b) == pytest.approx(1 - (0.5 + 2 / 3) / 2)
    assert neuron_set_difference(b, a) == neuron_set_difference(a, b)
    assert neuron_set_difference(a, a) == 0.0
    assert neuron_set_difference(a, mask(10, 7, 8)) == 1.0                      # disjoint
    assert neuron_set_difference(mask(10, 1), mask(10, 1, 2, 3, 4)) == pytest.approx(1 - (1 + 0.25) / 2)  # subset
    assert neuron_set_difference(mask(10), mask(10)) == 0.0                     # both empty: the same set
    assert neuron_set_difference(mask(10), a) == 1.0                            # one empty: nothing shared
    with pytest.raises(ValueError, match="different sizes"):
        neuron_set_difference(a, mask(11))
    m = difference_matrix([a, b, mask(10, 7, 8)])
    assert m.shape == (3, 3) and torch.equal(m, m.T) and torch.all(m.diagonal() == 0)
    assert m[0, 1] == pytest.approx(1 - (0.5 + 2 / 3) / 2) and m[0, 2] == 1.0 and m[1, 2] == 1.0


def test_counts_per_layer_match_locating():
    model, tok = load_backbone("tiny-qwen2")
    adapter = adapter_for(model)
    corpora = [{"en": ["Who founded the Gustave Tower?"], "de": ["Wer gründete den Gustave-Turm?"]},
               {"en": ["Where is Ramalinaceae found?", "Ramalinaceae is a family of"], "de": ["Wo lebt Ramalinaceae?"]}]
    beta = 0.6
    counts = factual_neuron_counts(model, adapter, tok, corpora, beta=beta)
    assert counts["layers"] == list(range(adapter.n_layers)) and counts["languages"] == ["en", "de"]
    per_lang_sum = {lang: torch.zeros(adapter.n_layers) for lang in ("en", "de")}
    for corpus, got in zip(corpora, counts["masks"]):
        want, per_lang = locate_group(model, adapter, counts["layers"], tok, corpus, beta=beta)
        assert torch.equal(got, want)                                             # D_G of every layer
        for lang, m in per_lang.items():
            per_lang_sum[lang] += m.sum(-1).float()
    for lang in ("en", "de"):
        assert counts["per_language"][lang] == pytest.approx((per_lang_sum[lang] / 2).tolist())
        # the intersection never holds more neurons than a language's own set
        assert all(i <= l + 1e-9 for i, l in zip(counts["intersection"], counts["per_language"][lang]))
    assert counts["intersection"] == pytest.approx([sum(int(m[i].sum()) for m in counts["masks"]) / 2
                                                   for i in range(adapter.n_layers)])
    assert 0 < sum(counts["intersection"]) < sum(counts["per_language"]["en"])  # beta 0.6 leaves a real choice


def test_plots_command_writes_figures_numbers_and_tensorboard(tmp_path):
    main(["plots", "-c", str(CONFIGS / "tiny.yaml"), "--data.groups", "0:4", "--data.languages", "[en,zh,de]",
           "--layer", "2", "--locate.beta", "0.5", "--output", str(tmp_path / "fig"), "--log_dir", str(tmp_path / "tb")])
    for name in ("factual_neurons_per_layer.png", "neuron_difference_layer2.png"):
        data = (tmp_path / "fig" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    summary = json.loads((tmp_path / "fig/neurons.json").read_text())
    assert summary["languages"] == ["en", "zh", "de"] and summary["layers"] == [0, 1, 2, 3]
    assert summary["beta"] == 0.5 and summary["groups"] == ["mzsre:0", "mzsre:1", "mzsre:2", "mzsre:3"]
    heat = summary["heatmap"]
    assert heat["layer"] == 2 and len(heat["difference"]) == 4
    assert all(heat["difference"][i][i] == 0.0 for i in range(4))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"plots/factual_neurons_per_layer", "plots/neuron_difference_layer2"} <= set(acc.Tags()["images"])
    assert [e.value for e in acc.Scalars("plots/intersection")] == pytest.approx(summary["intersection"])


def test_plots_refuses_a_layer_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="--layer: layer index"):
        plots(Settings.from_config(CONFIGS / "tiny.yaml", overrides={"data.groups": "0:1"}), output=str(tmp_path), layer=9)


def _results_file(path, languages, seed=0):
    """A results file as ``lafn evaluate --output`` writes it, with random scores (pre_edit has no
    Locality, as in a real file)."""
    gen = torch.Generator().manual_seed(seed)
    metrics = ("reliability", "generality", "locality", "portability")

    def table(setting):
        out = {}
        for m in metrics:
            row = {lang: {"f1": round(float(torch.rand(1, generator=gen)) * 100, 4),
                          "em": round(float(torch.rand(1, generator=gen)) * 100, 4)} for lang in languages}
            row["avg"] = {"f1": sum(c["f1"] for c in row.values()) / len(languages), "em": 0.0}
            if setting == "pre_edit" and m == "locality":
                row = {lang: {"f1": None, "em": None} for lang in [*languages, "avg"]}
            out[m] = row
        return out

    data = {s: table(s) for s in ("edit_one_test_one", "all_cached", "pre_edit")}
    data["meta"] = {"mode": "multilingual", "backbone": {"name": "tiny"}, "matcher": "router", "method": None,
                    "languages": languages, "runs": {"multilingual": {"groups_evaluated": 3}}}
    path.write_text(json.dumps(data))
    return data


def test_plots_results_draws_the_files_scores_per_language(tmp_path, monkeypatch):
    import matplotlib.figure

    languages = ["en", "zh", "de", "th"]
    data = _results_file(tmp_path / "results.json", languages)
    drawn, save = [], matplotlib.figure.Figure.savefig

    def keep(fig, path, *a, **k):
        drawn.append(fig)
        return save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    main(["plots", "--results", str(tmp_path / "results.json"), "--output", str(tmp_path / "fig")])
    png = (tmp_path / "fig" / "scores_per_language.png").read_bytes()
    assert png.startswith(PNG) and len(drawn) == 1
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*languages, "avg"]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert list(bars) == ["Reliability", "Generality", "Locality", "Portability"]
    for metric, heights in bars.items():                       # all_cached, F1: the default
        assert heights == pytest.approx([data["all_cached"][metric.lower()][lang]["f1"] for lang in [*languages, "avg"]])


def test_language_scores_picks_the_setting_and_leaves_unscored_cells_empty(tmp_path):
    from lafn_lightning.evaluation.plots import language_scores, plot_language_scores

    data = _results_file(tmp_path / "results.json", ["en", "cz"], seed=1)
    one = language_scores(data, "edit_one_test_one", score="em")
    assert one["setting"] == "edit_one_test_one" and one["languages"] == ["en", "cz", "avg"]
    assert one["metrics"]["portability"] == [data["edit_one_test_one"]["portability"][lang]["em"] for lang in one["languages"]]
    del data["all_cached"]                                      # a comparison method's file
    assert language_scores(data)["setting"] == "edit_one_test_one"
    pre = language_scores(data, "pre_edit")
    assert all(v != v for v in pre["metrics"]["locality"])      # no samples: NaN, drawn as no bar
    ax = plot_language_scores(pre).axes[0]
    assert all(p.get_height() != p.get_height() for p in ax.containers[2].patches)
    with pytest.raises(ValueError, match="no setting 'all_cached'"):
        language_scores(data, "all_cached")
    with pytest.raises(ValueError, match="no 'generation' view"):
        language_scores(data, view="generation")
