"""ReMaKE (Wang, Haddow & Birch 2023): retrieve stored facts and put them before the query.

    kb = KnowledgeBase.build(model, tok, groups, ["en", "zh"], distractors=2000)   # edits + zsRE facts
    kb.save("edits/remake_kb")                      # kb.safetensors + kb.json (with the fingerprint)
    remake = RemakeRetriever(model, tok, KnowledgeBase.load("edits/remake_kb", model))
    prompts = remake.prompts(["Who is the father of X?"])   # context + query, scored as usual

As a method of ``lafn evaluate --method methods/remake-demo``: :class:`RemakeMethod`.

Retriever: the original's XLM-R relevance classifier cannot be downloaded here; this one embeds
questions with the backbone itself (mean of a middle layer's hidden states, mean-centred, cosine),
takes the top-1 fact per edited language and keeps it only above a relevance threshold.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..backbone.fingerprint import fingerprint
from ..data import EditGroup
from ..backbone.ffn import adapter_for
from ..data.packaged import read_zsre_train as packaged_zsre_train
from ..editing.prompts import join_prompt_target
from ..files import atomic_write
from .base import deprecated_names

#: How a retrieved fact and the query are written: "plain" = "{question} {answer}\n{query}";
#: "qa" = ReMaKE's "Question: {q} Answer: {a}\nQuestion: {query} Answer:".
TEMPLATES = ("plain", "qa")


def read_zsre_train(language: str, limit: int | None = None) -> list[tuple[str, str]]:
    """The packaged zsRE training facts of ``language`` that have an answer (knowledge-base distractors)."""
    return [(q, a) for q, a in packaged_zsre_train(language, limit=limit) if q and a]


def default_layer(model: nn.Module) -> int:
    """The middle decoder layer (its output), the default embedding site."""
    return adapter_for(model).n_layers // 2


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], layer: int | Sequence[int], *,
          batch_size: int = 32) -> torch.Tensor:
    """Mean over the non-special tokens of the hidden state after decoder layer ``layer``
    (``hidden_states[layer + 1]``), float32 ``[len(texts), hidden]``; for a list of layers
    ``[len(layers), len(texts), hidden]`` from the same forwards."""
    layers = [int(layer)] if isinstance(layer, int) else [int(i) for i in layer]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(device) for k, v in enc.items()}
        states = model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
        keep = (enc["attention_mask"].bool() & ~special.to(device)).unsqueeze(-1).float()
        out.append(torch.stack([((states[i + 1].float() * keep).sum(1) / keep.sum(1).clamp(min=1)).cpu()
                                for i in layers]))
    result = torch.cat(out, dim=1) if out else torch.zeros(len(layers), 0, model.config.hidden_size)
    return result[0] if isinstance(layer, int) else result


@dataclass
class KnowledgeBase:
    """Stored facts: ``questions[i]``, ``answers[i]`` in ``languages[i]``, from edit group
    ``group_ids[i]`` ("" for a distractor), with unit-norm centred ``embeddings[i]``."""

    questions: list[str]
    answers: list[str]
    languages: list[str]
    group_ids: list[str]
    embeddings: torch.Tensor
    mean: torch.Tensor
    layer: int
    threshold: float
    fingerprint: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, tokenizer, groups: Sequence[EditGroup], languages: Sequence[str], *,
              distractors: int = 2000, layer: int | None = None, threshold: float | None = None,
              calibration: int = 200, batch_size: int = 32,
              facts: dict[str, list[tuple[str, str]]] | None = None,
              calibration_groups: Sequence[EditGroup] = ()) -> "KnowledgeBase":
        """The edits of ``groups`` in ``languages`` plus the first ``distractors`` zsRE training
        facts per language (``facts``: other ``(question, answer)`` lists per language, line i =
        the same fact). ``threshold`` None: calibrated on ``calibration_groups`` (edit groups that
        are not evaluated: :func:`calibrate_on_groups`) when given, else on the next
        ``calibration`` facts, which stay out of the KB (:func:`calibrate`)."""
        layer = default_layer(model) if layer is None else int(layer)
        q, a, lang, gid = [], [], [], []
        for g in groups:
            for x in languages:
                e = g.edits.get(x)
                if e is not None:
                    q.append(e.prompt), a.append(e.target), lang.append(x), gid.append(g.group_id)
        held_out = {}
        for x in languages:
            pool = facts[x][: distractors + calibration] if facts else read_zsre_train(x, distractors + calibration)
            for fq, fa in pool[:distractors]:
                q.append(fq), a.append(fa), lang.append(x), gid.append("")
            held_out[x] = pool[distractors:]
        raw = embed(model, tokenizer, q, layer, batch_size=batch_size)
        mean = raw[[i for i, g in enumerate(gid) if not g]].mean(0) if distractors else raw.mean(0)
        emb = torch.nn.functional.normalize(raw - mean, dim=-1)
        kb = cls(q, a, lang, gid, emb, mean, layer, float("nan"), fingerprint(model, [layer]))
        if threshold is not None:
            kb.threshold = float(threshold)
        elif calibration_groups:
            kb.threshold, kb.calibration = calibrate_on_groups(kb, model, tokenizer, calibration_groups, languages,
                                                               batch_size=batch_size)
        else:
            kb.threshold, kb.calibration = calibrate(kb, model, tokenizer, held_out, batch_size=batch_size)
        return kb

    def encode(self, model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        raw = embed(model, tokenizer, texts, self.layer, batch_size=batch_size)
        return torch.nn.functional.normalize(raw - self.mean, dim=-1)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / ".kb.safetensors.tmp"
        save_file({"embeddings": self.embeddings.contiguous(), "mean": self.mean.contiguous()}, str(tmp))
        os.replace(tmp, path / "kb.safetensors")
        meta = {"method": "remake", "format": 1, "layer": self.layer, "threshold": self.threshold,
                "fingerprint": self.fingerprint, "calibration": self.calibration, "questions": self.questions,
                "answers": self.answers, "languages": self.languages, "group_ids": self.group_ids}
        tmp = path / ".kb.json.tmp"
        tmp.write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path / "kb.json")
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "KnowledgeBase":
        """Read a saved KB; with ``model``, refuse one embedded by another backbone."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "kb.json").read_text(encoding="utf-8"))
        if model is not None:
            got = fingerprint(model, [meta["layer"]])
            diff = [k for k in ("architecture", "n_layers", "d_ff", "dtype", "layers_hash")
                    if got.get(k) != meta["fingerprint"].get(k)]
            if diff:
                raise ValueError(f"{path}: the knowledge base was embedded by another backbone ({', '.join(diff)} differ)")
        t = load_file(str(path / "kb.safetensors"))
        return cls(meta["questions"], meta["answers"], meta["languages"], meta["group_ids"], t["embeddings"],
                   t["mean"], meta["layer"], meta["threshold"], meta["fingerprint"], meta.get("calibration", {}))


def calibrate(kb: KnowledgeBase, model: nn.Module, tokenizer, held_out: dict[str, list[tuple[str, str]]],
              *, batch_size: int = 32) -> tuple[float, dict]:
    """A relevance threshold from zsRE facts that are not in the KB (never the evaluation data).

    Negatives: each held-out question's best score against the KB (a different fact, often the
    same relation). Positives: the same held-out fact in another KB language, scored against the
    question in this language (a cross-lingual paraphrase of a stored fact, the hard case).
    Threshold = the midpoint between the 95th percentile of the negatives and the median of the
    positives (or the negatives' 99th percentile when the positives are lower)."""
    langs = [x for x in held_out if held_out[x]]
    n = min(len(held_out[x]) for x in langs) if langs else 0
    if n == 0:
        return 0.5, {}
    emb = {x: kb.encode(model, tokenizer, [q for q, _ in held_out[x][:n]], batch_size) for x in langs}
    neg = torch.cat([(emb[x] @ kb.embeddings.T).max(1).values for x in langs])
    pos = torch.cat([(emb[x] * emb[y]).sum(1) for x in langs for y in langs if x != y]) if len(langs) > 1 else None
    neg95, neg99 = neg.quantile(0.95).item(), neg.quantile(0.99).item()
    info = {"negatives": n * len(langs), "neg_p50": neg.median().item(), "neg_p95": neg95, "neg_p99": neg99}
    if pos is not None:
        info.update(pos_p50=pos.median().item(), pos_p05=pos.quantile(0.05).item())
        threshold = (neg95 + info["pos_p50"]) / 2 if info["pos_p50"] > neg95 else neg99
    else:
        threshold = neg99
    info["threshold"] = threshold
    return threshold, info


def calibrate_on_groups(kb: KnowledgeBase, model: nn.Module, tokenizer, groups: Sequence[EditGroup],
                        languages: Sequence[str], *, batch_size: int = 32) -> tuple[float, dict]:
    """A relevance threshold from edit groups outside the evaluated ones (e.g. other MzsRE records).

    Positives: each group's rephrase against its own edit question, same language. Negatives: each
    group's locality question, its best score against the KB plus these groups' edit questions
    (what an unrelated query would retrieve). Threshold = midpoint between the negatives' 95th
    percentile and the positives' median (the negatives' 99th percentile if that is higher)."""
    edits, rephrases, localities = [], [], []
    for g in groups:
        for x in languages:
            e = g.edits.get(x)
            if e is not None and e.rephrase and e.locality_prompt:
                edits.append(e.prompt), rephrases.append(e.rephrase), localities.append(e.locality_prompt)
    if not edits:
        return 0.5, {}
    z = kb.encode(model, tokenizer, edits + rephrases + localities, batch_size)
    n = len(edits)
    ze, zr, zl = z[:n], z[n : 2 * n], z[2 * n :]
    pos = (zr * ze).sum(1)
    neg = torch.maximum((zl @ kb.embeddings.T).max(1).values, (zl @ ze.T).max(1).values)
    info = {"source": "held-out edit groups", "groups": len(groups), "pairs": n,
            "pos_p50": pos.median().item(), "pos_p10": pos.quantile(0.1).item(),
            "neg_p50": neg.median().item(), "neg_p95": neg.quantile(0.95).item(), "neg_p99": neg.quantile(0.99).item()}
    threshold = max((info["neg_p95"] + info["pos_p50"]) / 2, info["neg_p95"])
    info["threshold"] = threshold
    info["pos_above"] = (pos >= threshold).float().mean().item()
    info["neg_above"] = (neg >= threshold).float().mean().item()
    return threshold, info


class RemakeRetriever:
    """Retrieval-augmented prompts: for each query, the top-1 fact of each edited language whose
    cosine similarity reaches ``threshold`` is written before it. ``groups`` (in :meth:`prompts`)
    restricts the retrievable edits to those groups (distractors always stay)."""

    def __init__(self, model: nn.Module, tokenizer, kb: KnowledgeBase, *, threshold: float | None = None,
                 template: str = "plain", batch_size: int = 32) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}")
        self.model, self.tokenizer, self.kb = model, tokenizer, kb
        self.threshold = kb.threshold if threshold is None else float(threshold)
        self.template, self.batch_size = template, batch_size
        self.kb_languages = list(dict.fromkeys(kb.languages))
        self.log: list[dict] = []

    def retrieve(self, queries: Sequence[str], groups: Sequence[str] | None = None) -> list[list[tuple[int, float]]]:
        """Per query: ``(kb index, score)`` of the top-1 fact of each KB language above the threshold."""
        if not queries:
            return []
        q = self.kb.encode(self.model, self.tokenizer, queries, self.batch_size)
        scores = q @ self.kb.embeddings.T
        allowed = torch.tensor([not g or groups is None or g in groups for g in self.kb.group_ids])
        scores[:, ~allowed] = -2.0
        out = []
        for row in scores:
            hits = []
            for x in self.kb_languages:
                cols = torch.tensor([i for i, y in enumerate(self.kb.languages) if y == x])
                best = int(cols[row[cols].argmax()])
                if row[best].item() >= self.threshold:
                    hits.append((best, row[best].item()))
            out.append(sorted(hits, key=lambda h: -h[1]))
        return out

    def context(self, hits: Sequence[tuple[int, float]]) -> str:
        kb = self.kb
        if self.template == "qa":
            return "".join(f"Question: {kb.questions[i]} Answer: {kb.answers[i]}\n" for i, _ in hits)
        return "".join(join_prompt_target(kb.questions[i], kb.answers[i]) + "\n" for i, _ in hits)

    def prompts(self, queries: Sequence[str], groups: Sequence[str] | None = None) -> list[str]:
        """Each query with its retrieved facts before it (unchanged when nothing is retrieved,
        so an unrelated query gets exactly the backbone's prediction)."""
        out = []
        for query, hits in zip(queries, self.retrieve(queries, groups)):
            self.log.append({"query": query, "hits": [(self.kb.group_ids[i], self.kb.languages[i], round(s, 4))
                                                      for i, s in hits]})
            if not hits:
                out.append(query)
            elif self.template == "qa":
                out.append(self.context(hits) + f"Question: {query} Answer:")
            else:
                out.append(self.context(hits) + query)
        return out

    def stats(self) -> dict:
        """How many queries got context, and how many got a fact of an edit group."""
        n = len(self.log)
        return {"queries": n, "with_context": sum(bool(r["hits"]) for r in self.log),
                "with_edit_fact": sum(any(h[0] for h in r["hits"]) for r in self.log),
                "threshold": self.threshold, "layer": self.kb.layer, "calibration": self.kb.calibration}


@dataclass
class RemakeMethod:
    """ReMaKE as a method of ``lafn evaluate --method`` (see :mod:`lafn_lightning.methods.base`):
    one knowledge base over the evaluated groups' edit questions in every language plus
    ``distractors`` zsRE training facts per language, built once in ``workdir/kb`` (reused when it
    covers the groups); each group is scored with only its own edits retrievable (and the
    distractors), as edit-one-test-one. ``threshold`` None: calibrated on ``calibration`` held-out
    zsRE facts per language (never the evaluation data)."""

    layer: int | None = None
    threshold: float | None = None
    template: str = "plain"
    distractors: int = 1000
    calibration: int = 200

    name = "remake"

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"method.init_args.template={self.template!r}: one of {', '.join(TEMPLATES)}")
        self._remake: RemakeRetriever | None = None

    def prepare(self, model: nn.Module, tokenizer, groups: Sequence[EditGroup], workdir) -> None:
        path = Path(workdir) / "kb"
        want = {g.group_id for g in groups}
        kb = None
        if (path / "kb.json").exists():
            kb = KnowledgeBase.load(path, model)
            settings = json.loads((path / "kb.json").read_text(encoding="utf-8")).get("settings", {})
            if not want <= set(kb.group_ids) or settings != self._settings():
                kb = None
        if kb is None:
            kb = KnowledgeBase.build(model, tokenizer, groups, list(groups[0].languages), distractors=self.distractors,
                                     layer=self.layer, threshold=self.threshold, calibration=self.calibration)
            kb.save(path)
            meta = json.loads((path / "kb.json").read_text(encoding="utf-8"))
            meta["settings"] = self._settings()
            atomic_write(path / "kb.json", json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
        self._remake = RemakeRetriever(model, tokenizer, kb, threshold=self.threshold, template=self.template)

    def _settings(self) -> dict:
        return {"layer": self.layer, "threshold": self.threshold, "distractors": self.distractors,
                "calibration": self.calibration}

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tokenizer, groups: Sequence[EditGroup], workdir):
        from .base import InContext

        if self._remake is None:
            self.prepare(model, tokenizer, groups, workdir)
        ids = [g.group_id for g in groups]
        yield InContext(model, lambda prompts: self._remake.prompts(list(prompts), groups=ids))


#: deprecated class names that method configs and evaluation progress files may give
__getattr__ = deprecated_names(__name__, {"ReMaKEMethod": "RemakeMethod"})
