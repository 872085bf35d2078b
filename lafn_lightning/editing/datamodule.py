"""The edit batch as a LightningDataModule: one ``fit`` edits K groups at once.

    dm = EditBatchDataModule(groups="0:4", languages=["en", "zh"], backbone="demo")

Per group and language: M prefix-augmented target prompts (answer tokens and the subject's
last token marked), optionally the question's paraphrases as further target prompts, and one KL
anchor "{subject} is a"; built once in :meth:`setup`, yielded at every step.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..backbone.loading import load_backbone
from ..backbone.inputs import pad_rows
from ..data import DataError, EditGroup, default_dataset
from ..data.selection import select
from .prompts import RULES, anchor_text, encode_edit_text, sample_prefixes, subject_span

log = logging.getLogger(__name__)


#: where a prompt's ΔV sits when no subject form occurs in it: ``fallback`` (the paper: the
#: question's last token) or ``routed`` (the token the router fires on, rule ``aligned``)
SUBJECT_SITES = ("fallback", "routed")


def locating_corpus(group: EditGroup) -> dict[str, list[str]]:
    """Per language: the paraphrases when the data has them, else the edit question itself.
    Never the rephrase, locality or portability probes."""
    return {lang: list(e.paraphrases) or [e.prompt] for lang, e in group.edits.items()}


class RepeatBatch(IterableDataset):
    """Yields the same (whole) batch forever: every optimisation step sees the whole edit batch."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.batch


class EditBatchDataModule(L.LightningDataModule):
    """Edit groups of a dataset, encoded for one fit.

    Args:
        dataset: MzsRE folder (or pair file), Bi-ZsRE file or JSONL file (default: the MzsRE dev records).
        format: ``auto``, ``mzsre``, ``bizsre`` or ``jsonl``.
        languages: languages to edit (upstream codes; ``cs``/``nl`` accepted); None = all in the data.
        groups: which records form this edit batch: ``"start:stop[:step]"``, an index, a list of
            indices, or None (every record).
        paraphrases: optional JSONL of paraphrases (the locating corpus), see ``lafn paraphrase``.
        paraphrase_prompts: also train on the first this many paraphrases of each question (from
            ``paraphrases``), each a further target prompt without a prefix, so ΔV is fitted to other
            wordings of the question than the one edited. 0 (the paper): paraphrases only locate.
        num_prefixes: M, random prefixes per language (paper: 4).
        bare_prompt: one of the M prompts per language is the question with no prefix (as
            ROME/MEMIT's ``"{}"`` context template), the other M - 1 are sampled. The paper
            samples all M (false). Reliability scores that bare question: with all M prefixed, a
            group can reach the stop loss while the bare question's first answer token is still
            wrong (docs/twelve_languages.md). Same number of rows.
        prefix_length: tokens per prefix (paper: 5).
        seed: seed of the prefix sampling (prefixes depend only on seed and language).
        check_subjects: refuse subjects that cannot be matched sensibly (no letter or digit, a single
            letter, or found in more than 1% of ordinary questions); false to edit them anyway.
        strict: stop at the first record that cannot be edited (a refused subject, or no subject in
            its questions) instead of skipping it with its reason (``skipped``) and editing the rest.
        subject_site: where ΔV sits in an edit question that carries no subject form of its group:
            ``fallback`` (the paper: its last token, where no matcher fires at inference) or
            ``routed`` (the token the hidden-state router fires on, rule ``aligned``; docs/router.md).
        backbone, dtype: linked from the model; router_layer: the first edited layer (linked).
    """

    def __init__(
        self,
        dataset: str | None = None,
        format: str = "auto",
        languages: list[str] | None = None,
        groups: str | int | list[int] | None = "0:4",
        paraphrases: str | None = None,
        paraphrase_prompts: int = 0,
        num_prefixes: int = 4,
        bare_prompt: bool = False,
        prefix_length: int = 5,
        seed: int = 0,
        check_subjects: bool = True,
        strict: bool = False,
        subject_site: str = "fallback",
        backbone: str = "tiny-llama",
        dtype: str = "float32",
        router_layer: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_prefixes < 0 or prefix_length < 1:
            raise ValueError("data.num_prefixes must be >= 0 and data.prefix_length >= 1")
        if paraphrase_prompts < 0:
            raise ValueError(f"data.paraphrase_prompts={paraphrase_prompts}: 0 or more paraphrases per question")
        if paraphrase_prompts and not paraphrases:
            raise ValueError(f"data.paraphrase_prompts={paraphrase_prompts} trains on paraphrases: give them with "
                             "data.paraphrases (a JSONL written by `lafn paraphrase`)")
        if subject_site not in SUBJECT_SITES:
            raise ValueError(f"data.subject_site={subject_site!r}: one of {', '.join(SUBJECT_SITES)}")
        self.dataset = dataset or default_dataset()
        selection = select(self.dataset, format, languages, groups, paraphrases, check=check_subjects, strict=strict)
        self.groups: list[EditGroup] = selection.groups
        self.skipped: dict[str, str] = selection.skipped
        for reason in self.skipped.values():
            log.warning("skipped: %s", reason)
        self.batch: dict | None = None
        self.rule_counts: dict[str, Counter] = {}

    @property
    def languages(self) -> tuple[str, ...]:
        return self.groups[0].languages

    def locating_corpus(self, group: EditGroup) -> dict[str, list[str]]:
        return locating_corpus(group)

    def owned(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Edit-batch indices of the groups this process trains: group k goes to rank k % world_size.
        A group's rows never depend on the other groups, so its result does not depend on how many
        devices ran."""
        return [k for k in range(len(self.groups)) if k % world_size == rank]

    def _prefixes(self, model, tokenizer, lang: str) -> list[str]:
        """The M prompts' prefixes in ``lang`` (``""``: the bare question)."""
        hp = self.hparams
        bare = [""] if hp.bare_prompt or hp.num_prefixes == 0 else []
        sampled = max(0, hp.num_prefixes - len(bare))
        return bare + (sample_prefixes(model, tokenizer, lang, sampled, hp.prefix_length, seed=hp.seed) if sampled else [])

    def setup(self, stage: str | None = None) -> None:
        if self.batch is not None:
            return
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.mine = self.owned(rank, world)
        if not self.mine:
            raise ValueError(f"an edit batch of {len(self.groups)} group(s) cannot be split over {world} devices: "
                             "lower trainer.devices or select more data.groups")
        model, tokenizer = load_backbone(self.hparams.backbone, self.hparams.dtype)
        self.prefixes = prefixes = {lang: self._prefixes(model, tokenizer, lang) for lang in self.languages}
        rows, anchors = [], []
        self.rule_counts = {lang: Counter({r: 0 for r in RULES}) for lang in self.languages}
        site = self._site_rule(model, tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        for k in self.mine:
            group = self.groups[k]
            for li, (lang, edit) in enumerate(group.edits.items()):
                span = site(group, edit, edit.prompt)
                texts = [(f"{lang}.prompt", prefix, edit.prompt, span) for prefix in prefixes[lang]]
                texts += [(f"{lang}.paraphrases[{j}]", "", q, site(group, edit, q))
                          for j, q in enumerate(edit.paraphrases[:self.hparams.paraphrase_prompts])]
                for n, (field, prefix, question, at) in enumerate(texts):
                    enc = encode_edit_text(tokenizer, prefix, question, edit.target, edit.subject, group.subjects, at)
                    if limit and len(enc.input_ids) > limit:   # refused before training, not cut silently
                        raise DataError(f"{Path(str(self.dataset)).name}: record {group.index} ({group.group_id}), field "
                                        f"'{field}': {len(enc.input_ids)} tokens with its prefix and answer, beyond "
                                        f"the backbone's context of {limit}")
                    rows.append((k, li, enc))
                    if n == 0:   # the edit question's rule
                        self.rule_counts[lang][enc.rule] += 1
                a = encode_edit_text(tokenizer, "", anchor_text(lang, edit.subject), None, edit.subject, group.subjects)
                anchors.append((k, li, a))
        ids, att, shift = pad_rows([r[2].input_ids for r in rows], tokenizer.pad_token_id, left=True)
        # target_mask[r, t] is True where logits at t predict an answer token (token t + 1).
        target_mask = torch.zeros_like(ids, dtype=torch.bool)
        for r, (_, _, enc) in enumerate(rows):
            target_mask[r, [shift[r] + t - 1 for t in enc.target_positions]] = True
        a_ids, a_att, a_shift = pad_rows([a[2].input_ids for a in anchors], tokenizer.pad_token_id, left=True)
        self.batch = {
            "input_ids": ids, "attention_mask": att, "target_mask": target_mask,
            "group": torch.tensor([r[0] for r in rows]), "language": torch.tensor([r[1] for r in rows]),
            "subject_pos": torch.tensor([shift[r] + row[2].subject_pos for r, row in enumerate(rows)]),
            "kl_input_ids": a_ids, "kl_attention_mask": a_att,
            "kl_group": torch.tensor([a[0] for a in anchors]), "kl_language": torch.tensor([a[1] for a in anchors]),
            "kl_subject_pos": torch.tensor([a_shift[i] + a[2].subject_pos for i, a in enumerate(anchors)]),
        }
        for lang, counts in self.rule_counts.items():
            if counts["fallback"]:
                log.warning("%s: %d of %d edit questions contain no subject of their group; ΔV attaches to "
                            "their last token (rule 'fallback'; no matcher fires there at inference: "
                            "data.subject_site routed puts it where the router fires)", lang, counts["fallback"],
                            sum(counts.values()))
            if counts.get("aligned"):
                log.info("%s: %d of %d edit questions contain no subject of their group; ΔV attaches to the "
                         "token the router fires on (rule 'aligned')", lang, counts["aligned"], sum(counts.values()))

    def _site_rule(self, model, tokenizer):
        """``site(group, edit, question) -> (start, end, rule)`` in ``question`` (the edit question or one
        of its paraphrases), or None for the default rule."""
        if self.hparams.subject_site == "fallback":
            return lambda group, edit, question: None
        from ..routing.build import anchor_keys, routed_subject_span, standard_store

        layer = self.hparams.router_layer
        if layer is None:
            raise ValueError("data.subject_site routed needs data.router_layer (linked from model.layers by lafn)")
        store = standard_store(model, tokenizer, int(layer))
        anchors: dict[str, torch.Tensor] = {}   # per group, computed only for a question that needs them

        def site(group, edit, question):
            span = subject_span(question, edit.subject, group.subjects)
            if span[2] != "fallback":
                return span
            if group.group_id not in anchors:
                anchors[group.group_id] = anchor_keys(model, tokenizer, store, group)
            return routed_subject_span(model, tokenizer, store, question, edit.subject, group.subjects,
                                       anchors[group.group_id])
        return site

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RepeatBatch(self.batch), batch_size=None, num_workers=0)
