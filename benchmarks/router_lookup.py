"""Stage-2 lookup cost of the router vs the number of cached keys (flat scan, faiss HNSW, lexical-first).

    python benchmarks/router_lookup.py                    # 100 / 10k / 100k keys, d=640
    python benchmarks/router_lookup.py --sizes 100,10000 --tokens 20
    python benchmarks/router_lookup.py --sizes 400,40000,400000 --per_group 4   # 100 / 10k / 100k en+zh edits
    python benchmarks/router_lookup.py --sizes 400,40000,400000 --per_group 4 --kinds lexical
    python benchmarks/router_lookup.py --sizes 400,40000,400000 --per_group 4 --kinds lexical --tiers 0.7:0.6
    python benchmarks/router_lookup.py --sizes 400,40000,400000 --per_group 4 --kinds lexical --tiers 0.7:0.6 --subjects recombined
    python benchmarks/router_lookup.py --sizes 400,40000,400000 --per_group 4 --kinds lexical --queries 200 --tiers 0.7:0.6,0.5:0.9795:1 --subjects recombined   # the preset's tiers

Keys are random unit vectors in clusters (``--per_group`` keys around a group centre: 24 like a
12-language group's 12 anchors + 12 prompts, 4 for an en+zh group); a query is ``--tokens`` unit vectors, half of the queries
holding one token near a cached key. The figure is the median time of ``Router.scores`` (index
search + per-group reduction) per query, in process CPU time (the machine may be shared); HNSW
build time (CPU) is reported separately; recall@1 = HNSW's best group equals the flat scan's, on
the queries that hold a token near a cached key (on the others every score is noise).

``lexical`` (the lexical-first path, ``Router(lookup="auto")`` with the calibrated demo thresholds
1.0001 / 0.8748, lexical_min 0.5): every group also gets real subject strings, from the packaged
zsRE training facts whose English subject (``router_coverage/subj.py``: ``template_subject``) has 4+
letters (9,973 of 10,000; group k: the k-th of those, cyclically; en + zh for the first 9,973
groups, a random pair of languages after that, so beyond that facts repeat in other language
pairs: at 100k each subject is cached in about ten groups; ``--subjects recombined`` gives those
groups names recombined from two facts' subjects instead, nearly all distinct), subjects guessed from the
questions (the English one where a question spells it, else ``router_coverage/subj.py`` for
alphabetic scripts, for zh a 《title》 or the leading noun phrase). Queries are real
questions: half a cached fact's question (facts 0..99, cached at every size; one token's state near
one of that group's keys), half an MzsRE dev locality question (en / zh, random states). Timed:
``Router.scores(states, tokens, margins=True, text=question)`` ("lex ms", comparable with the other
columns; "fact ms" and "loc ms": the median over the cached facts' questions and over the locality
questions alone -- the median over all sits between the two kinds, where a small shift in the share
of queries that have lexical candidates moves it a lot) and the whole ``Router.route`` without stage 1 ("lex route ms": + the acceptance rule and
the site); "score ms": ``Router.scores`` with each query's lexical candidates and supports worked
out beforehand (the scoring of the candidates alone: what the lexical index cannot save, however
fast); "cands/q": groups with lexical support >= 0.5 per query (the only ones scored); "fired":
share of cached-fact queries routed to their group, "false": share of locality queries routed.
The lexical columns of all sizes are timed together, ``--block`` queries at one size and then the
same questions at the next, so that their ratios come from one stretch of the shared machine's load.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import torch


from lafn_lightning.data import default_dataset
from lafn_lightning.routing.router import Router, site_tokens
from lafn_lightning.routing.keys import KeyStore
from lafn_lightning.routing.lexical import _grams, fold

LANGS = ("en", "zh", "cz", "de", "du", "es", "fr", "pt", "ru", "tr", "vi")   # th: no reliable subject guess
_ZH_STOP = re.compile(r"[的是在属于有哪谁什位参出由为被与和及？?，,。]")


def zh_subject(question: str, en_subject: str) -> str:
    """A zh question's subject: the English one where it is spelled, else a 《title》, else the
    leading noun phrase (text before the first function character)."""
    if en_subject and fold(en_subject) in fold(question):
        return en_subject
    m = re.search(r"《(.+?)》", question)
    if m:
        return m.group(1)
    pieces = [p for p in _ZH_STOP.split(question) if len(p) >= 2]
    return pieces[0] if pieces else question[:4]


def fact_subjects() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(language -> subject, language -> question) of each of the 10,000 packaged zsRE training
    facts."""
    from router_coverage.subj import guess_subject, template_subject

    from lafn_lightning.data.packaged import read_zsre_train
    questions = {lang: [q for q, _ in read_zsre_train(lang)] for lang in LANGS}
    en = [template_subject(q) for q in questions["en"]]
    out = {"en": en, "zh": [zh_subject(q, s) for q, s in zip(questions["zh"], en)]}
    for lang in LANGS[2:]:
        out[lang] = [other_subject(q, s, guess_subject) for q, s in zip(questions[lang], en)]
    return out, questions


def other_subject(question: str, en_subject: str, guess) -> str:
    """An alphabetic-script question's subject: the English one where it is spelled, else the
    guessed capitalised run, unless that is shorter than 4 letters (a capitalised article such
    as "La", "Le"): then the English one."""
    if en_subject and fold(en_subject) in fold(question):
        return en_subject
    s = guess(question)
    return s if len(fold(s)) >= 4 else en_subject


def group_languages(k: int, n_facts: int) -> tuple[str, str]:
    """en + zh for the first ``n_facts`` groups (each fact once), then a random pair (fixed per
    group)."""
    if k < n_facts:
        return ("en", "zh")
    a, b = random.Random(k).sample(LANGS, 2)
    return (a, b)


def recombine(first: str, second: str) -> str:
    """A name that is neither: ``first`` without its last word + the last word of ``second``
    (a subject of one word, or without spaces: the first half of ``first`` + the second half of
    ``second``)."""
    a, b = first.split(), second.split()
    if len(a) > 1 and b:
        return " ".join(a[:-1] + b[-1:])
    return first[:max(1, len(first) // 2)] + second[len(second) // 2:]


def group_subjects(k: int, facts: list[int], subjects: dict[str, list[str]], mode: str) -> list[str]:
    """Group ``k``'s subjects (one per language of :func:`group_languages`): ``repeat``, the k-th
    fact's, cyclically (beyond the 9,973 facts each subject is cached again, in ten groups at
    100k); ``recombined``, beyond the facts, names recombined from two random facts' subjects
    (:func:`recombine`), so that nearly every group has subjects of its own."""
    langs = group_languages(k, len(facts))
    if mode == "repeat" or k < len(facts):
        i = facts[k % len(facts)]
        return list(dict.fromkeys(subjects[lang][i] for lang in langs))
    rng = random.Random(k)
    i, j = facts[rng.randrange(len(facts))], facts[rng.randrange(len(facts))]
    return list(dict.fromkeys(recombine(subjects[lang][i], subjects[lang][j]) for lang in langs))


def locality_questions() -> list[str]:
    path = Path(default_dataset()) / "mzsre_test_duplicate_enzh.json"
    recs = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for r in recs:
        out += [r["en"]["loc"].removeprefix("nq question: ").strip(), r["zh"]["loc"].strip()]
    return out


def even_spans(text: str, tokens: int) -> list[tuple[int, int]]:
    """A BOS (empty span) and ``tokens - 1`` tokens cutting ``text`` in equal pieces."""
    cuts = [round(i * len(text) / (tokens - 1)) for i in range(tokens)]
    return [(0, 0)] + [(a, b) for a, b in zip(cuts, cuts[1:])]


def make_store(n_keys: int, dim: int, per_group: int = 24, seed: int = 0) -> KeyStore:
    g = torch.Generator().manual_seed(seed)
    store = KeyStore(layer=5)
    n_groups = max(1, n_keys // per_group)
    centres = torch.nn.functional.normalize(torch.randn(n_groups, dim, generator=g), dim=-1)
    for k in range(n_groups):
        keys = centres[k] + 0.6 * torch.randn(per_group, dim, generator=g) / dim ** 0.5
        store.add(f"g{k}", keys)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,10000,100000")
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-search", type=int, default=48)
    ap.add_argument("--per_group", type=int, default=24, help="keys per cached edit group")
    ap.add_argument("--kinds", default="flat,hnsw,lexical", help="columns to measure (flat, hnsw, lexical)")
    ap.add_argument("--no-edges", action="store_true", help="lexical: Router(edges=False), one spelled end suffices")
    ap.add_argument("--subjects", choices=("repeat", "recombined"), default="repeat",
                    help="lexical: beyond the 9,973 facts, cache their subjects again (repeat) or recombined names")
    ap.add_argument("--block", type=int, default=20,
                    help="lexical: queries timed at one size before the next size's (sizes alternate by blocks)")
    ap.add_argument("--tiers", default="", help="lexical: further lexical tiers share:cosine,... (e.g. 0.7:0.6)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    g = torch.Generator().manual_seed(1)
    lex_data = (fact_subjects(), locality_questions()) if "lexical" in kinds else None
    print(f"{'keys':>8}{'edits':>8}{'flat ms':>10}{'hnsw ms':>10}{'hnsw build s':>14}{'hnsw recall@1':>15}"
          f"{'lex ms':>9}{'fact ms':>9}{'loc ms':>8}{'lex route ms':>14}{'score ms':>10}{'cands/q':>9}{'fired':>7}{'false':>7}")
    rows = {}
    nan = float("nan")
    stores = {n: make_store(n, args.dim, per_group=args.per_group) for n in sizes}
    # the lexical path: all sizes timed in alternating blocks (the shared machine's drift hits every size alike)
    lexes = measure_lexical(stores, lex_data, args, g) if lex_data else {}
    for n in sizes:
        store = stores[n]
        all_keys = torch.cat([k.float() for _, k in store.items()])
        queries = []
        for q in range(args.queries):
            x = torch.nn.functional.normalize(torch.randn(args.tokens, args.dim, generator=g), dim=-1)
            if q % 2:
                x[3] = torch.nn.functional.normalize(all_keys[q % len(all_keys)] + 0.05 * x[3], dim=0)
            queries.append(x)
        res = {}
        for kind in ("flat", "hnsw"):
            if kind not in kinds:
                res[kind] = (nan, nan, [None] * len(queries))
                continue
            router = Router(store, threshold=0.9, index=kind, hnsw_m=args.hnsw_m, ef_construction=40,
                            ef_search=args.ef_search)
            t0 = time.process_time()
            router.scores(queries[0], list(range(args.tokens)))  # builds the graph
            build = time.process_time() - t0
            times, hits = [], []
            for x in queries:
                t0 = time.process_time()  # CPU time: the machine may be shared
                best = router.scores(x, list(range(args.tokens)))
                times.append(time.process_time() - t0)
                hits.append(max(best.items(), key=lambda kv: kv[1][0])[0] if best else None)
            res[kind] = (statistics.median(times) * 1e3, build, hits)
        planted = range(1, len(queries), 2)   # queries holding a token near a cached key (the others match nothing)
        recall = (sum(res["flat"][2][q] == res["hnsw"][2][q] for q in planted) / max(1, len(planted))
                  if "flat" in kinds and "hnsw" in kinds else nan)
        lex = lexes.get(n, (nan,) * 8)
        rows[n] = {**{k: v[0] for k, v in res.items()}, "lexical": lex[0], "lexical fact": lex[5],
                   "lexical loc": lex[6], "lexical score": lex[7]}
        print(f"{n:8d}{n // args.per_group:8d}{res['flat'][0]:10.3f}{res['hnsw'][0]:10.3f}{res['hnsw'][1]:14.1f}"
              f"{recall:15.3f}{lex[0]:9.3f}{lex[5]:9.3f}{lex[6]:8.3f}{lex[1]:14.3f}{lex[7]:10.3f}{lex[2]:9.1f}{lex[3]:7.2f}"
              f"{lex[4]:7.2f}", flush=True)
    lo, hi = min(sizes), max(sizes)
    print(f"lookup ratio {hi} vs {lo} keys ({hi // args.per_group} vs {lo // args.per_group} edits): "
          + ", ".join(f"{k} {rows[hi][k] / rows[lo][k]:.2f}x" for k in ("flat", "hnsw", "lexical", "lexical fact", "lexical loc", "lexical score")
             if k.split()[0] in kinds))


def measure_lexical(stores: dict[int, KeyStore], data, args, g: torch.Generator) -> dict[int, tuple[float, ...]]:
    """Size -> (scores ms, route ms, candidate groups per query, fired, false, scores ms of the
    cached facts' questions, scores ms of the locality questions, scores ms with the lexical
    candidates given) of the lexical-first path. Each
    block of ``args.block`` queries is timed at every size in turn, so that the ratios between
    sizes come from one stretch of the shared machine's load (blocks, not single queries: a
    query right after one at another size would find the caches cold)."""
    (subjects, questions), locality = data
    facts = [i for i, s in enumerate(subjects["en"]) if len(fold(s)) >= 4]   # no "La", "Ma" guesses
    tiers = [tuple(map(float, t.split(":"))) for t in args.tiers.split(",") if t]
    routers, cases = {}, {}
    for n, store in stores.items():
        gids = store.group_ids()
        subs = {gid: group_subjects(k, facts, subjects, args.subjects) for k, gid in enumerate(gids)}
        routers[n] = Router(store, subs, threshold=1.0001, lexical_threshold=0.8748, lexical_min=0.5, stage1=None,
                            index="flat", lookup="lexical", lexical_tiers=tiers, edges=not args.no_edges)
        cases[n] = []   # (text, states, group the query is about or None)
        for q in range(args.queries):
            x = torch.nn.functional.normalize(torch.randn(args.tokens, args.dim, generator=g), dim=-1)
            if q % 2:
                k = (q // 2) % min(100, len(gids))
                text = questions[group_languages(k, len(facts))[(q // 2) % 2]][facts[k]]
                keys = store.keys(gids[k]).float()
                sites = site_tokens(even_spans(text, args.tokens))   # a token route() considers
                t = sites[min(3, len(sites) - 1)]
                x[t] = torch.nn.functional.normalize(keys[q % len(keys)] + 0.05 * x[t], dim=0)
                cases[n].append((text, x, gids[k]))
            else:
                cases[n].append((locality[(q // 2) % len(locality)], x, None))
    tokens = list(range(args.tokens))
    for n, router in routers.items():
        for text, x, _ in cases[n][:2]:   # warm the caches (a locality and a fact question: the key matrix)
            router.scores(x, tokens, margins=True, text=text)
    t_scores = {n: [] for n in stores}
    t_route = {n: [] for n in stores}
    t_given = {n: [] for n in stores}   # scores() with the lexical candidates worked out beforehand
    routed = {n: [None] * args.queries for n in stores}   # the timed route() calls' routes
    n_cands = {n: [0] * args.queries for n in stores}     # lexical candidate groups of each query
    for block in range(0, args.queries, args.block):
        for n, router in routers.items():
            for q in range(block, min(block + args.block, args.queries)):
                text, x, _ = cases[n][q]
                spans = even_spans(text, args.tokens)
                fold.cache_clear(), _grams.cache_clear()   # every query new to the folding caches
                t0 = time.process_time()
                router.scores(x, tokens, margins=True, text=text)
                t_scores[n].append(time.process_time() - t0)
                fold.cache_clear(), _grams.cache_clear()
                t0 = time.process_time()
                routed[n][q] = router.route(text, spans, x)
                t_route[n].append(time.process_time() - t0)
                support = router._candidate_support(text)   # what lexical_candidates() lists
                n_cands[n][q] = len(support)
                router._candidate_support = lambda _text, s=support: s   # an instance attribute: this query only
                t0 = time.process_time()
                router.scores(x, tokens, margins=True, text=text)
                t_given[n].append(time.process_time() - t0)
                del router._candidate_support
    out = {}
    for n in routers:
        cands, fired, false = n_cands[n], 0, 0
        for (_, _, own), routes in zip(cases[n], routed[n]):
            fired += own is not None and any(r.group_id == own for r in routes)
            false += own is None and bool(routes)
        half = max(1, len(cases[n]) // 2)
        by_kind = [statistics.median(t for t, (_, _, own) in zip(t_scores[n], cases[n]) if (own is None) == loc) * 1e3
                   for loc in (False, True)]
        out[n] = (statistics.median(t_scores[n]) * 1e3, statistics.median(t_route[n]) * 1e3, statistics.mean(cands),
                  fired / half, false / half, *by_kind, statistics.median(t_given[n]) * 1e3)
    return out

if __name__ == "__main__":
    main()
