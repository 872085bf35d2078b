"""Paraphrases of edit questions (the locating corpus) from a local instruct model.

    kept, dropped = select_paraphrases(parse_paraphrases(reply), group, "en", n=30)

Never an evaluation probe (leak guard); ``lafn paraphrase`` (:mod:`lafn_lightning.api.corpus`)
writes them resumably. Details: docs/paraphrase.md.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence


from ..data import EditGroup, normalize_language
from ..data.records import _probe_key
from ..files import complete_lines

__all__ = ["LANGUAGE_NAMES", "DEFAULT_INSTRUCTION", "build_instruction", "parse_paraphrases", "select_paraphrases",
           "load_instruct_model", "generate_replies", "existing_records"]

LANGUAGE_NAMES = {
    "en": "English", "cz": "Czech", "de": "German", "du": "Dutch", "es": "Spanish", "fr": "French",
    "pt": "Portuguese", "ru": "Russian", "th": "Thai", "tr": "Turkish", "vi": "Vietnamese", "zh": "Chinese",
}

DEFAULT_INSTRUCTION = (
    "Write {n} different paraphrases of the following question in {language}. Every paraphrase must ask "
    "the same question and must contain the subject \"{subject}\" exactly as written. "
    "Output one paraphrase per line, numbered, and nothing else.\n\nQuestion: {question}"
)

_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}\s*[\.\):：、．]|[-*•·]|\d{1,3}\s+(?=\D))\s*")
_QUOTES = "\"'“”‘’«»「」『』"


def build_instruction(template: str, question: str, subject: str, language: str, n: int) -> str:
    return template.format(n=n, language=LANGUAGE_NAMES.get(language, language), subject=subject, question=question)


def parse_paraphrases(text: str) -> list[str]:
    """Candidate paraphrases in a model's reply: one per line, numbering/bullets and surrounding
    quotes removed, empty lines dropped (order kept, duplicates kept)."""
    out = []
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip(_QUOTES).strip()
        if line:
            out.append(line)
    return out


def required_subjects(group: EditGroup, language: str) -> list[str]:
    """The subject forms a paraphrase of this question must keep: those of the group that occur
    in the question (the language's own first), else the language's own subject."""
    e = group.edits[language]
    found = [s for s in dict.fromkeys((e.subject, *group.subjects)) if s and s in e.prompt]
    return found or [e.subject]


def select_paraphrases(candidates: Iterable[str], group: EditGroup, language: str, *, n: int,
                       keep_any: bool = False, already: Sequence[str] = ()) -> tuple[list[str], dict[str, int]]:
    """Filter candidates for one (group, language): subject kept (unless ``keep_any``), not the
    edit question, not an evaluation probe of any language of the group, no duplicates (also of
    ``already``); at most ``n`` in all. Returns the new paraphrases and drop counts."""
    e = group.edits[language]
    probes = {_probe_key(p) for edit in group.edits.values() for p in edit.probes}
    seen = {_probe_key(p) for p in already} | {_probe_key(e.prompt)}
    required = required_subjects(group, language)
    kept: list[str] = []
    dropped = {"probe": 0, "no_subject": 0, "duplicate": 0}
    for cand in candidates:
        if len(already) + len(kept) >= n:
            break
        key = _probe_key(cand)
        if key in probes:
            dropped["probe"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        elif not keep_any and not any(s in cand for s in required):
            dropped["no_subject"] += 1
        else:
            kept.append(cand)
            seen.add(key)
    return kept, dropped


def load_instruct_model(path: str | Path, dtype: str = "float32"):
    """A causal LM and its tokenizer from a local folder (``local_files_only``: no download)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..backbone.loading import resolve_dtype

    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path}: not a local model folder (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _chat_text(tokenizer, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return instruction + "\n"


def generate_replies(model, tokenizer, instructions: Sequence[str], *, max_new_tokens: int, sample: bool,
                     seed: int = 0, temperature: float = 0.9, top_p: float = 0.95) -> list[str]:
    """One reply per instruction (a left-padded batch): greedy, or sampled with ``seed``."""
    import torch
    from transformers import GenerationConfig

    texts = [_chat_text(tokenizer, ins) for ins in instructions]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not has_template)
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}))
    with torch.no_grad():
        if sample:
            torch.manual_seed(seed)
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             generation_config=config)
    new = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


class EndpointError(ValueError):
    """An OpenAI-compatible endpoint that cannot be reached or answers something else than a chat completion."""


def _post_json(url: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise EndpointError(f"{url}: HTTP {exc.code} {exc.reason}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise EndpointError(f"{url}: cannot reach the endpoint ({getattr(exc, 'reason', exc)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EndpointError(f"{url}: the reply is not JSON ({exc})") from None


def check_endpoint(endpoint: str, model: str, *, api_key: str | None = None, timeout: float = 10.0) -> None:
    """Refuse an endpoint that does not answer ``GET {endpoint}/models`` or does not serve ``model``
    (before any question is sent)."""
    listing = _post_json(endpoint.rstrip("/") + "/models", None, api_key, timeout)
    served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
    if served and model not in served:
        raise EndpointError(f"{endpoint}: does not serve model {model!r}; it serves {', '.join(map(str, served))}")


def endpoint_replies(endpoint: str, model: str, instructions: Sequence[str], *, max_new_tokens: int, sample: bool,
                     seed: int = 0, temperature: float = 0.9, top_p: float = 0.95, api_key: str | None = None,
                     timeout: float = 600.0) -> list[str]:
    """One reply per instruction from an OpenAI-compatible ``POST {endpoint}/chat/completions``
    (vLLM, llama.cpp server, Ollama, ...; the paper used Qwen2-72B-Instruct through such an API).

        replies = endpoint_replies("http://127.0.0.1:8000/v1", "Qwen2-72B-Instruct", ["..."],
                                   max_new_tokens=1024, sample=False)

    Greedy is ``temperature 0``; sampled requests carry ``seed`` (servers that ignore it still sample)."""
    url = endpoint.rstrip("/") + "/chat/completions"
    replies = []
    for instruction in instructions:
        body = {"model": model, "messages": [{"role": "user", "content": instruction}],
                "max_tokens": max_new_tokens, "n": 1,
                **({"temperature": temperature, "top_p": top_p, "seed": seed} if sample else {"temperature": 0.0})}
        reply = _post_json(url, body, api_key, timeout)
        try:
            replies.append(str(reply["choices"][0]["message"]["content"] or ""))
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{url}: the reply has no choices[0].message.content: {str(reply)[:300]}") from None
    return replies


def existing_records(path: Path) -> set[tuple[str, str]]:
    """(group_id, language) pairs already in the output; cuts off a partial last line."""
    if not path.exists():
        return set()
    done = set()
    for n, line in enumerate(complete_lines(path), 1):
        try:
            obj = json.loads(line)
            done.add((obj["group_id"], normalize_language(obj["language"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: line {n} is not a paraphrase record ({exc}); fix or remove it") from None
    return done
