"""Locating (paper Eq. 4-6) on a hand-built model whose activation signs are known."""
import torch
from torch import nn

from lafn_lightning.backbone.ffn import adapter_for
from lafn_lightning.editing.locate import (agnostic_neurons, count_activations, count_activations_of_sets, language_neurons,
                                          locate_group, locate_groups, random_like)


class _Cfg:
    num_hidden_layers = 1


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(4, 4, bias=False)
        self.up_proj = nn.Linear(4, 4, bias=False)
        self.down_proj = nn.Linear(4, 4, bias=False)
        self.act_fn = nn.SiLU()
        with torch.no_grad():
            self.gate_proj.weight.copy_(torch.eye(4))

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        return self.mlp(x)


class OneHotLM(nn.Module):
    """Token t activates exactly neuron t % 4 (one-hot embedding through an identity gate)."""

    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.embed = nn.Embedding(16, 4)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(4).repeat(4, 1))
        self.layers = nn.ModuleList([_Layer()])

    def forward(self, input_ids, attention_mask=None):
        return self.layers[0](self.embed(input_ids))


class CharTokenizer:
    """'abcd' -> ids 0..3 (no special tokens), right padding with id 4 (activates neuron 0)."""

    def __call__(self, texts, return_tensors=None, padding=False, return_special_tokens_mask=False):
        width = max(map(len, texts))
        ids = torch.full((len(texts), width), 4)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(["abcd".index(c) for c in t])
            mask[i, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask, "special_tokens_mask": torch.zeros_like(mask)}


def test_counts_thresholds_and_intersection_are_exact():
    model, tok = OneHotLM(), CharTokenizer()
    adapter = adapter_for(model)
    assert adapter.family == "gated" and adapter.d_ff == 4
    # Padding (id 4 -> neuron 0) must not be counted.
    en = count_activations(model, adapter, [0], tok, ["aaab", "bc", "a"], batch_size=2)
    zh = count_activations(model, adapter, [0], tok, ["dddd", "dbaa"])
    assert en.tolist() == [[4, 2, 1, 0]]
    assert zh.tolist() == [[2, 1, 0, 5]]
    # D_l = {j : n_j / max n > beta}
    assert language_neurons(en, 0.25).tolist() == [[True, True, False, False]]   # 1/4 is not > 0.25
    assert language_neurons(en, 0.0).tolist() == [[True, True, True, False]]
    assert language_neurons(zh, 0.25).tolist() == [[True, False, False, True]]   # 1/5 = 0.2
    # D_G = intersection over languages.
    assert agnostic_neurons({"en": en, "zh": zh}, 0.25).tolist() == [[True, False, False, False]]
    assert agnostic_neurons({"en": en, "zh": zh}, 0.0).tolist() == [[True, True, False, False]]


def test_strategies_all_and_random():
    model, tok = OneHotLM(), CharTokenizer()
    adapter = adapter_for(model)
    corpus = {"en": ["aaab", "bc"], "zh": ["dbaa"]}
    lafn, per_lang = locate_group(model, adapter, [0], tok, corpus, beta=0.0)
    assert lafn.tolist() == [[True, True, False, False]] and set(per_lang) == {"en", "zh"}
    every, _ = locate_group(model, adapter, [0], tok, corpus, beta=0.0, strategy="all")
    assert every.all()
    rand, _ = locate_group(model, adapter, [0], tok, corpus, beta=0.0, strategy="random", seed=3)
    assert int(rand.sum()) == int(lafn.sum())
    big = torch.zeros(2, 1000, dtype=torch.bool)
    big[:, :100] = True
    r1, r2 = random_like(big, seed=1), random_like(big, seed=2)
    assert r1.sum(-1).tolist() == [100, 100] and not torch.equal(r1, r2)
    assert torch.equal(r1, random_like(big, seed=1))


class TwoLayerLM(OneHotLM):
    """OneHotLM with a second layer above, which counts its calls."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"num_hidden_layers": 2})()
        self.layers.append(_Layer())
        self.calls_above = 0
        self.layers[1].register_forward_pre_hook(lambda *_: setattr(self, "calls_above", self.calls_above + 1))

    def forward(self, input_ids, attention_mask=None):
        return self.layers[1](self.layers[0](self.embed(input_ids)))


def test_sets_share_forwards_count_alone_and_stop_after_the_top_edited_layer():
    model, tok = TwoLayerLM(), CharTokenizer()
    adapter = adapter_for(model)
    sets = [["aaab", "bc", "a"], ["dddd", "dbaa"], [], ["c"]]
    alone = [count_activations(model, adapter, [0], tok, s) if s else torch.zeros(1, 4, dtype=torch.long) for s in sets]
    model.calls_above = 0
    shared = count_activations_of_sets(model, adapter, [0], tok, sets, batch_size=4)   # 6 texts: 2 mixed forwards
    assert [c.tolist() for c in shared] == [c.tolist() for c in alone]
    assert alone[0].tolist() == [[4, 2, 1, 0]] and alone[3].tolist() == [[0, 0, 1, 0]]
    assert model.calls_above == 0                       # layer 1 is above the edited layer 0: never run
    count_activations_of_sets(model, adapter, [1, 0], tok, sets)
    assert model.calls_above > 0                        # ... and runs when it is edited
    corpora = [{"en": sets[0], "zh": sets[1]}, {"en": sets[3], "zh": sets[0]}]
    together = locate_groups(model, adapter, [0], tok, corpora, beta=0.0)
    for corpus, (mask, per_lang) in zip(corpora, together):
        want, want_lang = locate_group(model, adapter, [0], tok, corpus, beta=0.0)
        assert torch.equal(mask, want) and all(torch.equal(per_lang[k], want_lang[k]) for k in corpus)
