"""``lafn paraphrase``: write the locating corpus (paraphrases of each edit question), resumably.

    paraphrase(Settings.from_config("demo"), instruct_model="/models/Qwen2-7B-Instruct", output="para.jsonl")
    paraphrase(settings, instruct_model="Qwen2-72B-Instruct", endpoint="http://127.0.0.1:8000/v1", output="para.jsonl")

The file is what ``--data.paraphrases`` reads. Rules (subject kept, no probe leaks): docs/paraphrase.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from ..editing.paraphrase import (DEFAULT_INSTRUCTION, build_instruction, check_endpoint, endpoint_replies,
                                  existing_records, generate_replies, load_instruct_model, parse_paraphrases, required_subjects, select_paraphrases)
from ..files import append_line
from .settings import Settings

__all__ = ["paraphrase"]


def paraphrase(settings: Settings, instruct_model: str, output: str, num: int = 30, rounds: int = 3,
               max_new_tokens: int = 1024, batch_size: int = 4, instruct_dtype: str = "float32",
               keep_any: bool = False, instruction: str = DEFAULT_INSTRUCTION, endpoint: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", generate: Callable[..., list[str]] | None = None) -> None:
    """Generate paraphrases of every selected edit question with an instruct model: a local folder,
    or a model served by an OpenAI-compatible chat endpoint (``endpoint``).

    Args:
        settings: the parsed config; ``data.*`` selects the questions, ``seed_everything`` seeds the
            sampled rounds.
        instruct_model: local folder of a Hugging Face instruct (chat) model (nothing is downloaded),
            or with ``endpoint`` the model name the endpoint serves.
        output: JSONL file to append to (read by ``--data.paraphrases``).
        num: paraphrases per question (paper: 30).
        rounds: generation attempts per question (the first greedy, then sampled).
        max_new_tokens: tokens per reply.
        batch_size: questions per generate call.
        instruct_dtype: the instruct model's dtype (``model.dtype`` is the edited backbone's).
        keep_any: keep lines that lost the subject.
        instruction: ``str.format`` template with {n}, {language}, {subject}, {question}.
        endpoint: base URL of an OpenAI-compatible API (``http://host:port/v1``: vLLM, llama.cpp
            server, Ollama); checked with ``GET /models`` before any question is sent.
        api_key_env: environment variable holding the endpoint's API key (sent if set).
        generate: replaces the model (Python only, e.g. tests):
            ``generate(instructions, sample=, seed=) -> replies``.
    """
    if num < 1 or rounds < 1 or batch_size < 1:
        raise ValueError("num, rounds and batch_size must be >= 1")
    from tqdm.auto import tqdm

    seed = settings.config.get("seed_everything")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    opt = SimpleNamespace(instruct_model=instruct_model, output=output, num=num, rounds=rounds,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=instruct_dtype, seed=seed,
                          keep_any=keep_any, instruction=instruction)
    groups = settings.load_groups()

    output = Path(opt.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = existing_records(output)
    todo = [(g, lang) for g in groups for lang in g.languages if (g.group_id, lang) not in done]
    print(f"[lafn] {sum(len(g.languages) for g in groups)} questions selected, {len(done)} already in {output}, "
          f"{len(todo)} to paraphrase", file=sys.stderr)
    if not todo:
        return
    if generate is None and endpoint:
        import os

        api_key = os.environ.get(api_key_env) or None
        check_endpoint(endpoint, instruct_model, api_key=api_key)

        def generate(instructions, *, sample, seed):
            return endpoint_replies(endpoint, instruct_model, instructions, max_new_tokens=opt.max_new_tokens,
                                    sample=sample, seed=seed, api_key=api_key)
    elif generate is None:
        model, tokenizer = load_instruct_model(opt.instruct_model, opt.dtype)

        def generate(instructions, *, sample, seed):
            return generate_replies(model, tokenizer, instructions, max_new_tokens=opt.max_new_tokens,
                                    sample=sample, seed=seed)

    totals = {"probe": 0, "no_subject": 0, "duplicate": 0, "empty": 0, "short": 0}
    with tqdm(total=len(todo), desc="paraphrase", unit="question") as bar:
        for start in range(0, len(todo), opt.batch_size):
            chunk = todo[start:start + opt.batch_size]
            found: list[list[str]] = [[] for _ in chunk]
            for r in range(opt.rounds):
                open_ = [i for i in range(len(chunk)) if len(found[i]) < opt.num]
                if not open_:
                    break
                instructions = []
                for i in open_:
                    g, lang = chunk[i]
                    e = g.edits[lang]
                    instructions.append(build_instruction(opt.instruction, e.prompt, required_subjects(g, lang)[0],
                                                          lang, opt.num))
                replies = generate(instructions, sample=r > 0, seed=opt.seed + r)
                for i, reply in zip(open_, replies):
                    g, lang = chunk[i]
                    kept, dropped = select_paraphrases(parse_paraphrases(reply), g, lang, n=opt.num,
                                                       keep_any=opt.keep_any, already=found[i])
                    found[i] += kept
                    for k, v in dropped.items():
                        totals[k] += v
            for (g, lang), paras in zip(chunk, found):
                totals["empty"] += not paras
                totals["short"] += 0 < len(paras) < opt.num
                append_line(output, json.dumps({"group_id": g.group_id, "language": lang, "paraphrases": paras},
                                               ensure_ascii=False))
                bar.update(1)
    print(f"[lafn] wrote {len(todo)} line(s) to {output}; dropped {totals['probe']} equal to an evaluation probe, "
          f"{totals['no_subject']} without the subject, {totals['duplicate']} duplicates; "
          f"{totals['empty']} question(s) got no paraphrase, {totals['short']} fewer than {opt.num}", file=sys.stderr)
