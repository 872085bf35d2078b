"""Time of ``SubjectGramIndex.supports`` per query vs the number of cached groups and ``overlap``.

    python benchmarks/router_dev/gram_index.py                       # 100 / 10k / 100k groups, overlap 1,3,5,8
    python benchmarks/router_dev/gram_index.py --sizes 100000 --overlaps 3,5

The groups and questions are those of ``benchmarks/router_lookup.py --per_group 4 --kinds
lexical`` (real zsRE subjects, en + zh, then facts repeated in other language pairs; half the
queries a cached fact's question, half an MzsRE dev locality question), without keys: this times
the lexical index alone. Figures: the median process CPU time per query (folding caches cleared
before each query), one list per repetition (indexes timed in turn, so a noisy neighbour hits all);
"postings": posted n-grams in all; "reached": subjects checked exactly per query.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import router_lookup as rl  # noqa: E402

from lafn_lightning.routing.lexical import SubjectGramIndex, _grams, fold  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,10000,100000")
    ap.add_argument("--overlaps", default="1,3,5,8")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    (subjects, questions), locality = rl.fact_subjects(), rl.locality_questions()
    facts = [i for i, s in enumerate(subjects["en"]) if len(fold(s)) >= 4]
    texts = []
    for q in range(args.queries):
        k = (q // 2) % 100
        texts.append(questions[rl.group_languages(k, len(facts))[(q // 2) % 2]][facts[k]] if q % 2
                     else locality[(q // 2) % len(locality)])
    print(f"{'groups':>8}{'overlap':>9}{'postings':>10}{'reached':>9}  ms per query (one per repetition)")
    for n in (int(s) for s in args.sizes.split(",")):
        subs = {f"g{k}": list(dict.fromkeys(subjects[lang][facts[k % len(facts)]]
                                            for lang in rl.group_languages(k, len(facts)))) for k in range(n)}
        ixs = {}
        for ov in (int(s) for s in args.overlaps.split(",")):
            ix = ixs[ov] = SubjectGramIndex(0.5, overlap=ov, edges=True)
            for g, s in subs.items():
                ix.add(g, s)
            ix.supports("warm")
        times = {ov: [] for ov in ixs}
        for _ in range(args.reps):
            for ov, ix in ixs.items():
                ts = []
                for t in texts:
                    fold.cache_clear(), _grams.cache_clear()
                    t0 = time.process_time()
                    ix.supports(t)
                    ts.append(time.process_time() - t0)
                times[ov].append(statistics.median(ts) * 1e3)
        for ov, ix in ixs.items():
            r = statistics.mean(len(ix.reached(fold(t))[1]) for t in texts)
            print(f"{n:8d}{ov:9d}{sum(ix.posting_sizes()):10d}{r:9.1f}  " + " ".join(f"{t:.3f}" for t in times[ov]),
                  flush=True)


if __name__ == "__main__":
    main()
