"""Stage-2 lookup cost of the router vs the number of cached keys (flat scan vs faiss HNSW).

    python benchmarks/router_lookup.py                    # 100 / 10k / 100k keys, d=640
    python benchmarks/router_lookup.py --sizes 100,10000 --tokens 20
    python benchmarks/router_lookup.py --sizes 400,40000,400000 --per_group 4   # 100 / 10k / 100k en+zh edits

Keys are random unit vectors in clusters (``--per_group`` keys around a group centre: 24 like a
12-language group's 12 anchors + 12 prompts, 4 for an en+zh group); a query is ``--tokens`` unit vectors, half of the queries
holding one token near a cached key. The figure is the median time of ``Router.scores`` (index
search + per-group reduction) per query, in process CPU time (the machine may be shared); HNSW
build time (CPU) is reported separately; recall@1 = HNSW's best group equals the flat scan's, on
the queries that hold a token near a cached key (on the others every score is noise).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafn_lightning.routing.router import Router  # noqa: E402
from lafn_lightning.routing.keys import KeyStore  # noqa: E402


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    g = torch.Generator().manual_seed(1)
    print(f"{'keys':>8}{'flat ms':>10}{'hnsw ms':>10}{'hnsw build s':>14}{'hnsw recall@1':>15}")
    rows = {}
    for n in sizes:
        store = make_store(n, args.dim, per_group=args.per_group)
        all_keys = torch.cat([k.float() for _, k in store.items()])
        queries = []
        for q in range(args.queries):
            x = torch.nn.functional.normalize(torch.randn(args.tokens, args.dim, generator=g), dim=-1)
            if q % 2:
                x[3] = torch.nn.functional.normalize(all_keys[q % len(all_keys)] + 0.05 * x[3], dim=0)
            queries.append(x)
        res = {}
        for kind in ("flat", "hnsw"):
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
        recall = sum(res["flat"][2][q] == res["hnsw"][2][q] for q in planted) / max(1, len(planted))
        rows[n] = res
        print(f"{n:8d}{res['flat'][0]:10.3f}{res['hnsw'][0]:10.3f}{res['hnsw'][1]:14.1f}{recall:15.3f}", flush=True)
    lo, hi = min(sizes), max(sizes)
    print(f"lookup ratio {hi} vs {lo} keys: flat {rows[hi]['flat'][0] / rows[lo]['flat'][0]:.1f}x, "
          f"hnsw {rows[hi]['hnsw'][0] / rows[lo]['hnsw'][0]:.1f}x")


if __name__ == "__main__":
    main()
