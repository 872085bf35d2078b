"""Inference overhead of EditedModel vs the unedited backbone, with 100 / 10k / 100k cached edits.

    python benchmarks/inference_overhead.py                      # demo backbone (Gemma-3-270M)
    python benchmarks/inference_overhead.py --backbone tiny      # tiny random Llama: a quick run
    python benchmarks/inference_overhead.py --matcher router --sizes 100,10000   # the hidden-state router

In one process, on one backbone:

* **caches**: one edit cache per size, written with ``lafn_lightning.cache.write_shard`` in shards
  of ``--shard-size`` groups. The first groups carry the real MzsRE dev subjects (all 12
  languages); the rest are synthetic groups with random pseudo-word subjects (a Latin-script and
  a CJK form). Every group has a random mask (``--located`` share of d_ff per edited layer) and
  random fp16 values, and the backbone's real fingerprint, so the caches open like real ones.
* **forward latency** (batch of one query, ``torch.no_grad``): the unedited model vs
  ``EditedModel`` on *non-matching* queries (MzsRE locality questions, checked to match nothing)
  and on *matching* queries (MzsRE edit questions in several languages, each finding its group,
  which is in every cache). Each query runs base and edited back to back (order flipped every
  time); the overhead is the median over all (repetition, query) pairs of edited/base - 1. Matching queries
  are timed warm (their ΔV in the model's small in-memory LRU); the cold read of one group's ΔV
  from disk is reported separately.
* **lookup**: ``EditedModel.find_sites`` (text recovery + subject matching) per query, median
  over calls with the cache sizes interleaved call by call.
* **disk**: bytes per edit (shards + manifest) vs the located values (2 bytes each) plus the
  packed masks (d_ff/8 bytes per layer).

The last line is ``overhead_nonmatching=X% overhead_matching=Y% lookup_ratio_100k_vs_100=Z``
where X and Y are the worst over the cache sizes and Z compares the largest size with the smallest
(100k vs 100 by default). The machine may be shared: keep ``--threads``
at what is really free.

With ``--matcher router`` every cache also gets a router key file: the real groups' keys are
built from their prompts (``routing.build.add_group``), each synthetic group gets 3 random unit
keys (the count of a distractor fact: anchor + 2 questions; random keys never fire, so the
router's cost, not its accuracy, is measured); thresholds, lexical tiers and ``common_from`` from
the ``routing`` section of ``configs/<backbone>.yaml``. Routing happens inside the edited forward (a pre-hook at the router's
layer), and "lookup" times ``find_sites``, which also runs the layers below the router.

The overhead is a fixed cost per query (text recovery and lookup, ~20-30 µs; on a match also the
hooks, ~0.1-0.2 ms), so its share depends on the backbone: against the demo model's ~150 ms
forward it is well under 1%; against the tiny model's ~1 ms forward (``--backbone tiny``, a
smoke run) it is ~10-20%, which says nothing about a real deployment.
"""
from __future__ import annotations

import argparse
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from lafn_lightning.api.settings import resolve_config
from lafn_lightning.backbone.fingerprint import fingerprint
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.cache import CacheEntry, EditCache, write_shard
from lafn_lightning.data import default_dataset, load_groups
from lafn_lightning.inference.edited_model import EditedModel
from lafn_lightning.backbone.ffn import adapter_for

BACKBONES = {"tiny": "tiny-llama", "demo": "demo"}
LATIN = "bcdfghjklmnprstvz"
VOWELS = "aeiou"


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(LATIN) + rng.choice(VOWELS) for _ in range(rng.randint(2, 4))).title()


def synthetic_subjects(rng: random.Random) -> dict[str, str]:
    en = " ".join(pseudo_word(rng) for _ in range(rng.randint(1, 3)))
    zh = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(4, 6)))
    return {"en": en, "zh": zh}


def edited_layers(args, backbone: str) -> list[int]:
    if args.layers:
        return [int(x) for x in args.layers.split(",")]
    import yaml

    name = "tiny" if backbone.startswith("tiny") else backbone
    try:
        config = Path(resolve_config(name))
    except FileNotFoundError:
        raise SystemExit(f"no shipped config {name!r} to take the edited layers from; give --layers") from None
    return list(yaml.safe_load(config.read_text())["model"]["layers"])


def build_caches(root: Path, sizes: list[int], real_groups, fp: dict, layers: list[int], d_ff: int,
                 located: float, shard_size: int, seed: int) -> dict[int, Path]:
    """One cache directory per size; group i is the same edit in every cache that holds it."""
    dirs = {n: root / f"cache_{n}" for n in sizes}
    todo = []
    for n, d in dirs.items():
        if (d / "manifest.json").exists():
            try:
                cache = EditCache.open(d, fp)
                if len(cache) == n:
                    continue  # reuse (--workdir)
            except Exception:
                pass
            shutil.rmtree(d)
        todo.append(n)
    if not todo:
        return dirs
    top = max(todo)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n_real = len(real_groups)
    t0 = time.perf_counter()
    for start in range(0, top, shard_size):
        stop = min(start + shard_size, top)
        k = stop - start
        masks = torch.rand(k, len(layers), d_ff, generator=gen) < located
        deltas = torch.randn(k, len(layers), d_ff, generator=gen) * masks
        entries = []
        for j, i in enumerate(range(start, stop)):
            if i < n_real:
                g = real_groups[i]
                gid, subjects = g.group_id, {l: e.subject for l, e in g.edits.items()}
            else:
                gid, subjects = f"synthetic:{i}", synthetic_subjects(rng)
            entries.append(CacheEntry(gid, subjects, tuple(layers), masks[j], deltas[j], {"synthetic": True}))
        for n in todo:
            lo, hi = start, min(stop, n)
            if lo < hi:
                write_shard(dirs[n], entries[: hi - lo], fp, shard_name=f"bench-{lo:07d}")
        print(f"  wrote groups {start}..{stop - 1} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return dirs


def router_thresholds(backbone: str) -> tuple[float, float | None, list, int]:
    """(threshold, lexical threshold, lexical tiers, common_from) of the backbone's config."""
    import yaml

    name = "tiny" if backbone.startswith("tiny") else backbone
    routing = (yaml.safe_load(Path(resolve_config(name)).read_text()) or {}).get("routing") or {}
    if routing.get("threshold") is None:
        return 0.999, None, [], 0   # a backbone without calibrated thresholds (tiny): only near-copies fire
    return (routing["threshold"], routing.get("lexical_threshold"), routing.get("lexical_tiers") or [],
            routing.get("common_from") or 0)


def build_router_keys(model, tokenizer, dirs: dict[int, Path], real_groups, fp: dict, layer: int,
                      thresholds: tuple[float, float | None, list, int], seed: int) -> None:
    """A router key file in each cache: real groups' keys from their prompts (and, with
    ``common_from``, their background-fact counts), 3 random unit keys per synthetic group (no
    count: never common)."""
    from lafn_lightning.routing.build import add_group, set_background_facts, standard_store
    from lafn_lightning.routing.keys import KEYS_FILE, KeyStore

    t0 = time.perf_counter()
    base = standard_store(model, tokenizer, layer, fp)
    base.threshold, base.lexical_threshold, tiers, common_from = thresholds
    for g in real_groups:
        add_group(model, tokenizer, base, g)
    if common_from:
        set_background_facts(base, {g.group_id: g.subjects for g in real_groups})
    gen = torch.Generator().manual_seed(seed)
    top = max(dirs)
    synthetic = {f"synthetic:{i}": torch.randn(3, base.dim, generator=gen) for i in range(len(real_groups), top)}
    for n, d in sorted(dirs.items()):
        if (d / KEYS_FILE).exists():
            continue
        store = KeyStore(layer, fp, base.dim, center=base.center, threshold=base.threshold,
                         lexical_threshold=base.lexical_threshold, lexical_tiers=tiers, common_from=common_from)
        for gid, keys in base.items():
            store.add(gid, keys.float())
        store.set_common(base.all_common())
        for i in range(len(real_groups), n):
            store.add(f"synthetic:{i}", synthetic[f"synthetic:{i}"])
        store.save(d / KEYS_FILE)
    print(f"  router keys built ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def pick_queries(groups, tokenizer, per_language: int = 1):
    """Matching: edit questions whose own group is found; non-matching: locality questions."""
    from lafn_lightning.text.matching import SubjectMatcher

    matcher = SubjectMatcher({g.group_id: g.subjects for g in groups}, mode="exact")
    matching, nonmatching = [], []
    langs = groups[0].languages
    order = [l for l in ("en", "zh", "ru", "th", "de", "vi", "tr", "fr", "cz", "es", "pt", "du") if l in langs]
    for lang in order + [l for l in langs if l not in order]:
        got_m = got_n = 0
        for g in groups[langs.index(lang) * 7:] + groups:  # spread the picks over the groups
            e = g.edits[lang]
            if got_m < per_language and g.group_id in {m.group_id for m in matcher.find(e.prompt)}:
                matching.append(e.prompt)
                got_m += 1
            if got_n < per_language and e.locality_prompt and not matcher.find(e.locality_prompt):
                nonmatching.append(e.locality_prompt)
                got_n += 1
            if got_m >= per_language and got_n >= per_language:
                break
    enc = lambda texts: [tokenizer(t, return_tensors="pt") for t in texts]  # noqa: E731
    return enc(matching), enc(nonmatching)


def time_call(fn, enc) -> float:
    t0 = time.perf_counter()
    fn(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="demo", help="demo, tiny, or any load_backbone spec")
    parser.add_argument("--layers", help="edited layers, comma-separated (default: configs/<backbone>.yaml)")
    parser.add_argument("--sizes", default="100,10000,100000")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (interleaved)")
    parser.add_argument("--queries", type=int, default=6, help="matching and non-matching queries each "
                        "(one per language, up to 12)")
    parser.add_argument("--matcher", default="exact", choices=("exact", "normalized", "fuzzy", "router"))
    parser.add_argument("--located", type=float, default=0.03, help="share of d_ff located per layer")
    parser.add_argument("--shard-size", type=int, default=5000, help="groups per synthetic shard")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", help="keep (and reuse) the caches here instead of a temp dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    spec = BACKBONES.get(args.backbone, args.backbone)

    model, tokenizer = load_backbone(spec)
    adapter = adapter_for(model)
    layers = edited_layers(args, spec)
    fp = fingerprint(model, layers)
    real = load_groups(default_dataset())[: min(sizes)]
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lafn-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"backbone {spec}: {type(model).__name__}, d_ff {adapter.d_ff}, edited layers {layers}, "
              f"{args.threads} thread(s); building caches in {root}", file=sys.stderr)
        t0 = time.perf_counter()
        dirs = build_caches(root, sizes, real, fp, layers, adapter.d_ff, args.located, args.shard_size, args.seed)
        if args.matcher == "router":
            build_router_keys(model, tokenizer, dirs, real, fp, min(layers), router_thresholds(spec), args.seed)
        build_s = time.perf_counter() - t0

        models, open_s, stats = {}, {}, {}
        for n in sizes:
            gc.collect()
            t0 = time.perf_counter()
            models[n] = EditedModel(model, tokenizer, dirs[n], matcher=args.matcher)
            open_s[n] = time.perf_counter() - t0
            stats[n] = models[n].cache.stats()

        matching, nonmatching = pick_queries(real, tokenizer)
        matching, nonmatching = matching[: args.queries], nonmatching[: args.queries]
        # every query behaves as intended at every size
        for n, em in models.items():
            for enc in matching:
                assert em.find_sites(enc["input_ids"], enc["attention_mask"]), (n, "matching query found nothing")
            nonmatching = [enc for enc in nonmatching if not em.find_sites(enc["input_ids"], enc["attention_mask"])]
        mixed = matching + nonmatching

        # cold ΔV reads (groups never read before): the first group of a shard pays the shard's
        # sha256 check and header parse; later groups of an open shard only their own bytes
        cold = {}
        for n, em in models.items():
            rng = random.Random(n)
            by_shard: dict[str, list[str]] = {}
            for gid in rng.sample(em.cache.group_ids, min(2000, n)):
                by_shard.setdefault(em.cache.info(gid)["shard"], []).append(gid)
            shards = rng.sample(sorted(by_shard), min(8, len(by_shard)))
            first, later = [], []
            for shard in shards:
                gids = rng.sample(by_shard[shard], min(1 + 20 // len(shards), len(by_shard[shard])))
                for k, gid in enumerate(gids):
                    t0 = time.perf_counter()
                    em.delta(gid)
                    (later if k else first).append(time.perf_counter() - t0)
            cold[n] = (statistics.median(first), statistics.median(later) if later else float("nan"))
            em.clear_delta_cache()

        with torch.no_grad():
            for n, em in models.items():  # warm up: kernels, ΔV LRU, tokenizer caches
                for enc in mixed:
                    time_call(model, enc)
                    time_call(em, enc)
            # one ratio per (repetition, size, query): base and edited back to back, order flipped
            ratio = {(n, kind): [] for n in sizes for kind in ("nonmatching", "matching")}
            base_ms = {kind: [] for kind in ("nonmatching", "matching")}
            for rep in range(args.reps):
                for n, em in models.items():
                    for kind, queries in (("nonmatching", nonmatching), ("matching", matching)):
                        for q, enc in enumerate(queries):
                            if (rep + q) % 2:
                                te = time_call(em, enc)
                                tb = time_call(model, enc)
                            else:
                                tb = time_call(model, enc)
                                te = time_call(em, enc)
                            ratio[(n, kind)].append(te / tb)
                            base_ms[kind].append(1e3 * tb)

            lookup = {n: [] for n in sizes}  # one time per call, sizes interleaved
            for _ in range(max(20, 4 * args.reps)):
                for enc in mixed:
                    for n, em in models.items():
                        t0 = time.perf_counter()
                        em.find_sites(enc["input_ids"], enc["attention_mask"])
                        lookup[n].append(time.perf_counter() - t0)

        over = {k: 100 * (statistics.median(v) - 1) for k, v in ratio.items()}
        look = {n: statistics.median(v) for n, v in lookup.items()}
        n_layers = len(layers)
        mask_bytes = n_layers * ((adapter.d_ff + 7) // 8)

        print(f"\nbackbone {spec} ({type(model).__name__}, d_ff {adapter.d_ff}, edited layers {layers}), "
              f"matcher {args.matcher}, {args.threads} thread(s), {args.reps} interleaved repetitions")
        print(f"queries: {len(nonmatching)} non-matching (MzsRE locality), {len(matching)} matching "
              f"(MzsRE edit questions), batch 1; unedited forward median "
              f"{statistics.median(base_ms['nonmatching']):.1f} ms (non-matching), "
              f"{statistics.median(base_ms['matching']):.1f} ms (matching)")
        print(f"caches built in {build_s:.0f} s (shards of {args.shard_size} groups, {100 * args.located:g}% of d_ff "
              f"located per layer)\n")
        head = (f"{'edits':>8} {'open s':>7} {'overhead non-match':>19} {'overhead match':>15} "
                f"{'lookup µs/query':>16} {'ΔV read ms new/open shard':>26} {'bytes/edit':>11} {'ideal':>7} {'ratio':>6}")
        print(head)
        for n in sizes:
            s = stats[n]
            ideal = 2 * s["located_per_edit"] + mask_bytes
            print(f"{n:>8,} {open_s[n]:7.2f} {over[(n, 'nonmatching')]:18.2f}% {over[(n, 'matching')]:14.2f}% "
                  f"{1e6 * look[n]:16.1f} {1e3 * cold[n][0]:16.2f} / {1e3 * cold[n][1]:7.2f} {s['bytes_per_edit']:11.0f} {ideal:7.0f} "
                  f"{s['bytes_per_edit'] / ideal:6.2f}")
        top = max(sizes)
        s = stats[top]
        print(f"\nbytes/edit = (shards + manifest) / edits; ideal = located values x 2 bytes (fp16) + packed "
              f"masks ({mask_bytes} bytes); at {top:,} edits: shards {s['shard_bytes'] / top:.0f} B/edit, "
              f"manifest {s['manifest_bytes'] / top:.0f} B/edit (subjects, shard, sha256, counts); "
              f"dense fp32 would be {s['dense_fp32_bytes'] / top:.0f} B/edit")
        worst_n = max(over[(n, "nonmatching")] for n in sizes)
        worst_m = max(over[(n, "matching")] for n in sizes)
        print(f"overhead_nonmatching={worst_n:.2f}% overhead_matching={worst_m:.2f}% "
              f"lookup_ratio_100k_vs_100={look[top] / look[min(sizes)]:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
