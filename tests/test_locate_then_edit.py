"""M-ROME / M-MEMIT / M-PMET on a tiny Llama: update shape and rank, artifacts, cached statistics."""
from __future__ import annotations

import hashlib

import pytest
import torch

from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.methods import artifact, stats
from lafn_lightning.methods.compute_z import ValueHParams
from lafn_lightning.methods.memit import MemitMethod, memit_edit
from lafn_lightning.methods.pmet import PmetMethod, pmet_edit
from lafn_lightning.methods.requests import EditRequest
from lafn_lightning.methods.rome import RomeMethod, rome_edit

TEXTS = {"en": [(f"Who is person number {i}?", f"Someone {i}") for i in range(40)],
         "zh": [(f"第{i}号人物是谁？", f"某人{i}") for i in range(40)]}
REQUESTS = {
    "en": [EditRequest("en", "Where was Alice Smith born?", "Alice Smith", "Paris", "g0"),
           EditRequest("en", "Who founded Bob Corp?", "Bob Corp", "Eve", "g1")],
    "zh": [EditRequest("zh", "爱丽丝出生在哪里？", "爱丽丝", "巴黎", "g0"),
           EditRequest("zh", "鲍勃公司的创始人是谁？", "鲍勃公司", "伊芙", "g1")],
}
FAST = ValueHParams(v_num_grad_steps=3)


def _tiny(family, monkeypatch, tmp_path):
    torch.manual_seed(0)
    model, tok = load_backbone(f"tiny-{family}")
    monkeypatch.setattr(stats, "read_zsre_train",
                        lambda lang, limit=None: TEXTS[lang][:limit])
    monkeypatch.setenv("LAFN_STATS_DIR", str(tmp_path / "stats"))
    return model, tok


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    return _tiny("llama", monkeypatch, tmp_path)


@pytest.fixture()
def tiny_gemma(monkeypatch, tmp_path):
    """Gemma-3 layout: post-attention and post-FFN norms around every block."""
    return _tiny("gemma3", monkeypatch, tmp_path)


def _record(monkeypatch, module, name: str) -> list:
    """Patch ``module.name`` to record what each call returns; returns the record."""
    seen, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (lambda out: (seen.append(out), out)[1])(real(*a, **k)))
    return seen


def _param_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode()), h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _logits(model, tok):
    ids = tok(["Where was Alice Smith born? Paris", "爱丽丝出生在哪里？巴黎"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


EDITS = {
    "rome": (lambda m, t, r: rome_edit(m, t, r, RomeMethod(layer=1, value=FAST, prefixes=[[3, 2]], mom2_n_samples=40),
                                       log=lambda *_: None), [1]),
    "memit": (lambda m, t, r: memit_edit(m, t, r, MemitMethod(layers=[1, 2], value=FAST, prefixes=[[3, 2]],
                                                               mom2_update_weight=10.0, mom2_n_samples=40),
                                         log=lambda *_: None), [1, 2]),
    "pmet": (lambda m, t, r: pmet_edit(m, t, r, PmetMethod(layers=[1, 2], value=FAST, prefixes=[[3, 2]],
                                                            mom2_update_weight=10.0, mom2_n_samples=40),
                                       log=lambda *_: None), [1, 2]),
}


@pytest.mark.parametrize("method", sorted(EDITS))
def test_update_shape_rank_and_artifact_round_trip(tiny, tmp_path, method):
    model, tok = tiny
    edit, layers = EDITS[method]
    before_params, before_logits = _param_digest(model), _logits(model, tok)
    update = edit(model, tok, REQUESTS)
    d_model, d_ff = model.config.hidden_size, model.config.intermediate_size
    assert update.layers == layers
    for layer in layers:
        assert update.delta(layer).shape == (d_model, d_ff)
        # ROME: one rank-one edit per request (4 requests, applied in sequence); MEMIT/PMET: per
        # language one least-squares update of rank <= its 2 requests, so <= 4 per layer.
        assert update.factors[layer][0].shape[0] == 4
        assert 1 <= update.rank(layer) <= 4
    if method == "rome":
        one = edit(model, tok, {"en": REQUESTS["en"][:1]})
        assert one.rank(1) == 1
    assert _param_digest(model) == before_params          # editing changed no weight
    path = artifact.save_artifact(update, tmp_path / method, model=model, method=method, requests=REQUESTS["en"])
    handle = artifact.apply_artifact(model, path)
    edited = _logits(model, tok)
    assert not torch.equal(edited, before_logits)          # the artifact does something
    handle.remove()
    assert torch.equal(_logits(model, tok), before_logits)  # removing it restores the logits exactly
    assert _param_digest(model) == before_params


def test_joint_rome_writes_every_language_value_at_once(tiny):
    """joint: one update of rank = requests whose left rows are dual to the requests' keys, so
    request i's value change lands in full at its own key and nothing of it at the others' (the
    sequential rank-one updates move each other's sites)."""
    from lafn_lightning.methods.compute_z import read_sites
    model, tok = tiny
    reqs = {"en": REQUESTS["en"][:1], "zh": REQUESTS["zh"][:1]}
    flat = reqs["en"] + reqs["zh"]
    update = rome_edit(model, tok, reqs, RomeMethod(layer=1, value=FAST, prefixes=[[3, 2]], mom2_n_samples=40,
                                                     joint=True), log=lambda *_: None)
    left, right = update.factors[1]
    assert left.shape[0] == 2 and update.rank(1) == 2
    k_star, v_before = read_sites(model, tok, flat, [("down", 1, "in"), ("down", 1, "out")])
    torch.testing.assert_close(k_star.double() @ left.double().T, torch.eye(2, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    with update.applied(model):
        [v_after] = read_sites(model, tok, flat, [("down", 1, "out")])
    torch.testing.assert_close(v_after - v_before, right, rtol=1e-3, atol=1e-3)
    assert right.norm(dim=-1).min() > 0


@pytest.mark.parametrize("joint", [False, True])
def test_memit_joint_languages_is_one_solve_with_the_mean_statistics(tiny, monkeypatch, joint):
    """joint_languages: all languages' requests in one least-squares solve whose C is the mean of
    the languages' C_l; else one solve per language with its own C_l."""
    from lafn_lightning.methods import memit
    model, tok = tiny
    calls = []
    real = memit.spread

    def spy(model_, tok_, reqs, hp, prefixes, writes, *args, **kwargs):
        [(_, _, C, _)] = writes
        calls.append(([r.language for r in reqs], {layer: c.clone() for layer, c in C.items()}))
        return real(model_, tok_, reqs, hp, prefixes, writes, *args, **kwargs)

    monkeypatch.setattr(memit, "spread", spy)
    hp = MemitMethod(layers=[1, 2], value=FAST, prefixes=[[3, 2]], mom2_update_weight=10.0, mom2_n_samples=40,
                      joint_languages=joint)
    update = memit_edit(model, tok, REQUESTS, hp, log=lambda *_: None)
    C = {lang: stats.key_second_moments(model, tok, [1, 2], lang, n_samples=40) for lang in ("en", "zh")}
    if joint:
        assert [langs for langs, _ in calls] == [["en", "en", "zh", "zh"]]
        torch.testing.assert_close(calls[0][1][1], (C["en"][1] + C["zh"][1]) / 2)
    else:
        assert [langs for langs, _ in calls] == [["en", "en"], ["zh", "zh"]]
        torch.testing.assert_close(calls[1][1][2], C["zh"][2])
    assert update.factors[1][0].shape[0] == 4


def test_pmet_rewrite_o_proj_lands_the_attention_target_and_round_trips(tiny, tmp_path, monkeypatch):
    """rewrite [down, o_proj]: both optimised targets are written, the attention one into the
    attention output projection with its own key statistics; with a tiny lambda and the bare
    prompt as the only key, the attention output at the last edit layer reaches its target; the
    artifact stores and restores the o_proj factors."""
    from lafn_lightning.methods import memit, pmet
    from lafn_lightning.methods.compute_z import read_sites
    model, tok = tiny
    seen = []
    real = memit.spread
    monkeypatch.setattr(pmet, "spread", lambda *a, **k: (seen.append(a[5]), real(*a, **k))[1])
    hp = PmetMethod(layers=[1, 2], value=FAST, prefixes=[], mom2_update_weight=1e-6, mom2_n_samples=40,
                     rewrite=["down", "o_proj"], joint_languages=True)
    update = pmet_edit(model, tok, REQUESTS, hp, log=lambda *_: None)
    [writes] = seen
    assert [(m, site) for m, site, _, _ in writes] == [("down", ("down", 2)), ("o_proj", ("attn", 2))]
    d_attn = model.config.num_attention_heads * model.config.head_dim
    C_o = stats.key_second_moments(model, tok, [1], "en", n_samples=40, module="o_proj")[1]
    assert C_o.shape == (d_attn, d_attn)
    assert not torch.equal(C_o[:4, :4], stats.key_second_moments(model, tok, [1], "en", n_samples=40)[1][:4, :4])
    for layer in (1, 2):
        assert update.delta(layer, module="o_proj").shape == (model.config.hidden_size, d_attn)
        assert update.rank(layer, module="o_proj") == 4
    flat = REQUESTS["en"] + REQUESTS["zh"]
    z_attn = writes[1][3]
    [before] = read_sites(model, tok, flat, [("attn", 2, "out")])
    with update.applied(model):
        [after] = read_sites(model, tok, flat, [("attn", 2, "out")])
    assert (after - z_attn).norm() < 0.05 * (before - z_attn).norm()
    before_logits = _logits(model, tok)
    path = artifact.save_artifact(update, tmp_path / "pmet", model=model, method="pmet")
    loaded, record = artifact.load_artifact(path)
    assert sorted(loaded.parts) == sorted(update.parts) and record["ranks"]["o_proj.2"] == 4
    torch.testing.assert_close(loaded.delta(2, module="o_proj"), update.delta(2, module="o_proj"))
    handle = artifact.apply_artifact(model, path)
    assert not torch.equal(_logits(model, tok), before_logits)
    handle.remove()
    assert torch.equal(_logits(model, tok), before_logits)
    with pytest.raises(ValueError, match="rewrite"):
        PmetMethod(rewrite=["o_proj"])


def test_pmet_attention_clamp_bounds_the_attention_delta(tiny, monkeypatch):
    """attn_clamp_norm_factor bounds the attention delta relative to the attention output's norm
    while the FFN delta keeps the value's clamp; 0 leaves the whole edit to the FFN delta; null
    is PMET's (both deltas move)."""
    from lafn_lightning.methods import pmet
    model, tok = tiny
    seen = _record(monkeypatch, pmet, "optimise_values")
    value = ValueHParams(v_num_grad_steps=4, v_lr=2.0, v_weight_decay=0.0, clamp_norm_factor=4.0)
    reqs = {"en": REQUESTS["en"][:1]}
    for factor in (None, 0.01, 0.0):
        seen.clear()
        pmet_edit(model, tok, reqs, PmetMethod(layers=[1, 2], value=value, prefixes=[], mom2_update_weight=10.0,
                                                mom2_n_samples=40, attn_clamp_norm_factor=factor),
                  log=lambda *_: None)
        [(z_attn, z_ffn)] = seen
        attn, ffn = float(z_attn.delta.norm() / z_attn.init.norm()), float(z_ffn.delta.norm() / z_ffn.init.norm())
        assert ffn > 0.05, (factor, ffn)
        if factor is None:
            assert attn > 0.05
        else:
            assert attn <= factor + 1e-6, (factor, attn)
    assert z_attn.delta.abs().max() == 0
    with pytest.raises(ValueError, match="attn_clamp_norm_factor"):
        PmetMethod(attn_clamp_norm_factor=-1)


def test_pmet_writes_the_ffn_target_in_residual_units_through_post_ffn_norms(tiny_gemma, monkeypatch):
    """Gemma's post-FFN norms: PMET's layer-8 FFN-output target is a residual-stream change; an
    earlier layer's down_proj write must add that change (/ sqrt(layers left)) after its own norm,
    not the raw down_proj-unit difference (which a norm gain 8x the target layer's would scale
    ~8x)."""
    import math
    from lafn_lightning.methods import memit, pmet
    from lafn_lightning.methods.compute_z import read_sites
    from lafn_lightning.methods.lowrank import LowRankUpdate
    from lafn_lightning.methods.memit import down_to_residual
    model, tok = tiny_gemma
    with torch.no_grad():
        model.model.layers[1].post_feedforward_layernorm.weight.fill_(7.0)   # gain 8
        model.model.layers[2].post_feedforward_layernorm.weight.fill_(0.0)   # gain 1
    seen = []
    real = memit.spread
    monkeypatch.setattr(pmet, "spread", lambda *a, **k: (seen.append(a[5]), real(*a, **k))[1])
    req = REQUESTS["en"][0]
    hp = PmetMethod(layers=[1, 2], value=ValueHParams(v_num_grad_steps=5, clamp_norm_factor=4.0), prefixes=[],
                     mom2_update_weight=1e-6, mom2_n_samples=40)
    y1, y2 = read_sites(model, tok, [req], [("down", 1, "out"), ("down", 2, "out")])
    update = pmet_edit(model, tok, {"en": [req]}, hp, log=lambda *_: None)
    [[(_, _, _, z)]] = seen
    want = (down_to_residual(model, 2, z) - down_to_residual(model, 2, y2)) / math.sqrt(2)
    first = LowRankUpdate()
    first.parts[("down", 1)] = update.parts[("down", 1)]
    with first.applied(model):
        [y1_after] = read_sites(model, tok, [req], [("down", 1, "out")])
    got = down_to_residual(model, 1, y1_after) - down_to_residual(model, 1, y1)
    assert want.norm() > 0.1
    assert (got - want).norm() < 0.25 * want.norm(), (float((got - want).norm()), float(want.norm()))


def test_pmet_residual_spread_rule_lands_the_ffn_change_in_the_residual_stream(tiny_gemma, monkeypatch):
    """spread_rule residual: the FFN target's change (after the post-FFN norm) becomes a target for
    the last layer's residual output, and MEMIT's rule (which re-reads what earlier layers wrote)
    lands it; PMET's own rule adds the change at every layer and overshoots."""
    from lafn_lightning.methods import pmet
    from lafn_lightning.methods.compute_z import read_sites
    from lafn_lightning.methods.memit import down_to_residual
    model, tok = tiny_gemma
    seen = _record(monkeypatch, pmet, "optimise_values")
    req = REQUESTS["en"][0]
    [h, y] = read_sites(model, tok, [req], [("residual", 2, "out"), ("down", 2, "out")])
    miss = {}
    for rule in ("residual", "pmet"):
        seen.clear()
        hp = PmetMethod(layers=[0, 1, 2], value=ValueHParams(v_num_grad_steps=5, clamp_norm_factor=4.0),
                         prefixes=[], mom2_update_weight=1e-6, mom2_n_samples=40, attn_clamp_norm_factor=0.0,
                         spread_rule=rule)
        update = pmet_edit(model, tok, {"en": [req]}, hp, log=lambda *_: None)
        [(_, z_ffn)] = seen
        target = h + down_to_residual(model, 2, z_ffn.target[None]) - down_to_residual(model, 2, y)
        with update.applied(model):
            [after] = read_sites(model, tok, [req], [("residual", 2, "out")])
        miss[rule] = float((after - target).norm() / (h - target).norm())
    assert miss["residual"] < 0.2, miss
    assert miss["pmet"] > 2 * miss["residual"], miss
    with pytest.raises(ValueError, match="spread_rule"):
        PmetMethod(spread_rule="residual", rewrite=["down", "o_proj"])


def test_artifact_hooks_equal_dense_weight_edit(tiny, tmp_path):
    model, tok = tiny
    update = EDITS["memit"][0](model, tok, {"en": REQUESTS["en"]})
    with update.applied(model):
        hooked = _logits(model, tok)
    down = model.model.layers[1].mlp.down_proj, model.model.layers[2].mlp.down_proj
    saved = [d.weight.detach().clone() for d in down]
    with torch.no_grad():
        for d, layer in zip(down, (1, 2)):
            d.weight += update.delta(layer)
    dense = _logits(model, tok)
    with torch.no_grad():
        for d, w in zip(down, saved):
            d.weight.copy_(w)
    torch.testing.assert_close(hooked, dense, rtol=1e-4, atol=1e-4)


def test_artifact_refused_on_other_backbone(tiny, tmp_path):
    model, tok = tiny
    update = EDITS["rome"][0](model, tok, {"en": REQUESTS["en"][:1]})
    path = artifact.save_artifact(update, tmp_path / "r", model=model, method="rome")
    from lafn_lightning.backbone.loading import tiny_model
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="another backbone"):
        artifact.apply_artifact(other, path)


def test_statistics_per_language_cached_and_reused(tiny, tmp_path):
    model, tok = tiny
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        en = stats.key_second_moments(model, tok, [1, 2], "en", n_samples=40, progress=False)
        zh = stats.key_second_moments(model, tok, [1, 2], "zh", n_samples=40, progress=False)
        n_first = len(calls)
        assert n_first > 0
        again = stats.key_second_moments(model, tok, [1, 2], "en", n_samples=40, progress=False)
        assert len(calls) == n_first                          # read from disk, no forward pass
        more = stats.key_second_moments(model, tok, [1, 3], "en", n_samples=40, progress=False)
        assert len(calls) > n_first                           # layer 3 was missing: computed
        n_more = len(calls)
        model.config.name_or_path = "/elsewhere/same-weights"  # the same weights under another name
        stats.key_second_moments(model, tok, [1, 2], "en", n_samples=40, progress=False)
        assert len(calls) == n_more                           # still read from disk
    finally:
        handle.remove()
    files = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert len(files) == 5 and all(f.endswith(".safetensors") for f in files)
    d_ff = model.config.intermediate_size
    assert en[1].shape == (d_ff, d_ff)
    assert torch.equal(again[1], en[1]) and torch.equal(more[1], en[1])
    assert not torch.allclose(en[1], zh[1])                   # estimated per language
    assert torch.allclose(en[1], en[1].T, atol=1e-6)
    assert torch.linalg.eigvalsh(en[1].double()).min() > -1e-6  # a second moment is PSD


def test_every_method_config_builds_its_method():
    from pathlib import Path

    import yaml

    from lafn_lightning.methods.config import from_config

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "methods").glob("*.yaml"))
    files = [f for f in files if f.name.split("-")[0] in ("rome", "memit", "pmet")]  # LoRA-FT configs are LightningCLI configs
    assert len(files) >= 12
    for path in files:
        method = from_config(yaml.safe_load(path.read_text())["method"])
        assert method.name == path.name.split("-")[0], path.name
        assert callable(method.edit) and isinstance(method.value, ValueHParams)


def test_artifact_model_edits_only_its_own_calls(tiny, tmp_path):
    model, tok = tiny
    update = EDITS["rome"][0](model, tok, {"en": REQUESTS["en"][:1]})
    path = artifact.save_artifact(update, tmp_path / "r", model=model, method="rome")
    before = _logits(model, tok)
    edited = artifact.ArtifactModel(model, path)
    ids = tok(["Where was Alice Smith born? Paris", "爱丽丝出生在哪里？巴黎"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = edited(**ids).logits
    with update.applied(model):
        expected = _logits(model, tok)
    assert torch.equal(out, expected)
    assert torch.equal(_logits(model, tok), before)            # the backbone itself is untouched


def test_edit_groups_writes_one_request_per_language(tiny, tmp_path):
    import json

    from lafn_lightning.data import EditGroup, LanguageEdit
    from lafn_lightning.methods.run import edit_groups

    model, tok = tiny
    group = EditGroup("g0", 0, {"en": LanguageEdit("en", "Alice Smith", "Where was Alice Smith born?", "Paris"),
                                "zh": LanguageEdit("zh", "爱丽丝", "爱丽丝出生在哪里？", "巴黎")})
    method = RomeMethod(layer=1, value=FAST, prefixes=[[3, 1]], mom2_n_samples=40)
    path = edit_groups(method, model, tok, [group], out=tmp_path / "a", log=lambda *_: None)
    record = json.loads(path.read_text())
    assert record["method"] == "rome" and record["ranks"] == {"1": 2}
    assert [(r["language"], r["target"]) for r in record["requests"]] == [("en", "Paris"), ("zh", "巴黎")]


def test_skip_special_tokens_leaves_bos_untouched_in_prefill_and_edits_decoding(tiny, tmp_path):
    """skip_special_tokens: the artifact records the skipped ids and its hooks leave the positions
    of those ids (BOS) as the backbone computes them, also when read back from disk; other
    positions, and decoding steps past the prompt, get the update."""
    import json

    from lafn_lightning.data import EditGroup, LanguageEdit
    from lafn_lightning.methods.run import edit_groups

    model, tok = tiny
    group = EditGroup("g0", 0, {"en": LanguageEdit("en", "Alice Smith", "Where was Alice Smith born?", "Paris")})
    outs = {}
    for skip in (False, True):
        method = RomeMethod(layer=1, value=FAST, prefixes=[[3, 1]], mom2_n_samples=40, skip_special_tokens=skip)
        outs[skip] = edit_groups(method, model, tok, [group], out=tmp_path / f"s{skip}", log=lambda *_: None)
    assert json.loads(outs[True].read_text())["skip_token_ids"] == sorted(set(tok.all_special_ids))
    enc = tok(["Where was Alice Smith born? Paris"], return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.bos_token_id
    with torch.no_grad():
        base = model(**enc).logits[0]
        plain = artifact.ArtifactModel(model, outs[False])(**enc).logits[0]
        edited_model = artifact.ArtifactModel(model, outs[True])
        skipped = edited_model(**enc).logits[0]
    assert not torch.allclose(plain[0], base[0])               # without skipping, BOS is edited too
    torch.testing.assert_close(skipped[0], base[0])            # with it, BOS is the backbone's
    assert not torch.allclose(skipped[1:], base[1:])           # and the rest is edited
    # a decoding step after the prompt (one non-special token, KV cache) still gets the update
    with torch.no_grad():
        past = model(input_ids=enc["input_ids"][:, :-1], use_cache=True).past_key_values
        step_base = model(input_ids=enc["input_ids"][:, -1:], past_key_values=past, use_cache=True).logits
        with edited_model.update.applied(model):
            past_e = model(input_ids=enc["input_ids"][:, :-1], use_cache=True).past_key_values
            step_edit = model(input_ids=enc["input_ids"][:, -1:], past_key_values=past_e, use_cache=True).logits
    torch.testing.assert_close(step_edit[0, -1], skipped[-1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(step_edit, step_base)


def test_residual_to_down_inverts_the_post_ffn_norm_and_survives_a_zero_gain():
    from lafn_lightning.backbone.loading import tiny_model
    from lafn_lightning.methods.memit import residual_to_down

    torch.manual_seed(0)
    model = tiny_model("gemma3")
    norm = model.model.layers[1].post_feedforward_layernorm
    with torch.no_grad():
        norm.weight.fill_(3.0)          # gain 1 + w = 4
        norm.weight[0] = -1.0           # gain exactly 0 (as in the quantised demo backbone)
    y = torch.randn(2, model.config.hidden_size)
    r = 1e-3 * torch.randn(2, model.config.hidden_size)
    y[:, 0] = r[:, 0] = 0
    r -= (r * y).sum(-1, keepdim=True) / (y * y).sum(-1, keepdim=True) * y   # the norm cannot move along y
    dy = residual_to_down(model, 1, y, r)
    assert torch.isfinite(dy).all() and (dy[:, 0] == 0).all()
    with torch.no_grad():
        moved = norm(y + dy.float()) - norm(y)
    # away from the dead dimension, the norm's output moves by ~r (first order)
    torch.testing.assert_close(moved[:, 1:], r[:, 1:], rtol=0.1, atol=2e-4)
    llama = tiny_model("llama")
    assert torch.equal(residual_to_down(llama, 1, y, r), r)   # no post-FFN norm: unchanged
