"""Time of ``SubjectGramIndex.supports`` per query vs the number of cached groups and ``overlap``.

    python benchmarks/router_dev/gram_index.py                       # 100 / 10k / 100k groups, overlap 1,3,5,8
    python benchmarks/router_dev/gram_index.py --sizes 100000 --overlaps 3,5
    python benchmarks/router_dev/gram_index.py --sizes 100,100000 --overlaps 1,2,3,5 --subjects recombined --one-end --csr

The groups and questions are those of ``benchmarks/router_lookup.py --per_group 4 --kinds
lexical`` (real zsRE subjects, en + zh, then facts repeated in other language pairs, or with
``--subjects recombined`` names recombined from two facts; half the queries a cached fact's
question, half an MzsRE dev locality question), without keys: this times the lexical index alone.
Figures: the median process CPU time per query (folding caches cleared before each query), one
list per repetition (indexes timed in turn, so a noisy neighbour hits all); "postings": posted
n-grams in all; "read": posting entries read per query (median); "reached": subjects checked
exactly per query; "pass": subjects that pass (share and ends) per query, what any exact index must
return. ``--one-end`` times ``end_supports`` (the preset's one-end tier) instead of ``supports``.

``--csr`` (an experiment, session 16) also times the prefix filter followed by a vectorised share
check of the reached subjects (:func:`csr_reached`: a CSR of every subject's n-gram ids and a mask
of the query's n-grams, one gather and one ``np.add.reduceat``) instead of a Python set
intersection per subject: "csr ms", the median, without the end checks that follow.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import router_lookup as rl  # noqa: E402

from lafn_lightning.routing.lexical import SubjectGramIndex, _ends_spelled, _grams, fold  # noqa: E402


class CsrShares:
    """Every subject's n-gram ids of ``ix`` (a built index) as a CSR, for :func:`csr_reached`."""

    def __init__(self, ix: SubjectGramIndex) -> None:
        ix._refresh_arrays()
        self.vocab: dict[str, int] = {}
        ptr, ids = [0], []
        for e in ix._by_id:
            ids += [self.vocab.setdefault(x, len(self.vocab)) for x in (e.grams if e else ())]
            ptr.append(len(ids))
        self.ptr, self.ids = np.asarray(ptr), np.asarray(ids, dtype=np.int64)
        self.need = np.asarray([e.need if e else 1 << 30 for e in ix._by_id])
        self.mask = np.zeros(len(self.vocab), dtype=bool)
        self.mark = np.zeros(len(ix._by_id), dtype=np.int64)


def csr_reached(ix: SubjectGramIndex, csr: CsrShares, q: str) -> np.ndarray:
    """Ids of the subjects reached by ``ix``'s prefix filter whose n-gram share in the folded
    query ``q`` reaches ``ix.min_share``, the share counted in numpy. With ``overlap`` 1 every
    subject in a read posting list is reached (deduplicated without sorting); else the count
    filter of :meth:`SubjectGramIndex.reached`."""
    qg = {n: _grams(q, n) for n in ix._arrays}
    lists = [a for n, arrays in ix._arrays.items() for x in qg[n] if (a := arrays.get(x)) is not None]
    if not lists:
        return np.zeros(0, dtype=np.int64)
    ids = np.concatenate(lists)
    if ix.overlap > 1:
        count = np.bincount(ids)
        cand = np.unique(ids[count[ids] >= ix._hits[ids]])
    else:
        at = np.arange(len(ids))
        csr.mark[ids] = at
        cand = ids[csr.mark[ids] == at]
    if not len(cand):
        return cand
    start, lens = csr.ptr[cand], csr.ptr[cand + 1] - csr.ptr[cand]
    first = np.cumsum(lens) - lens
    at = np.repeat(start - first, lens) + np.arange(int(lens.sum()))
    qids = [i for n in qg for x in qg[n] if (i := csr.vocab.get(x)) is not None]
    csr.mask[qids] = True
    hits = np.add.reduceat(csr.mask[csr.ids[at]], first)
    csr.mask[qids] = False
    return cand[hits >= csr.need[cand]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,10000,100000")
    ap.add_argument("--overlaps", default="1,3,5,8")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--subjects", choices=("repeat", "recombined"), default="repeat",
                    help="beyond the 9,973 facts: repeat them, or recombine names (router_lookup.py)")
    ap.add_argument("--one-end", action="store_true", help="time end_supports (one-end tier) instead of supports")
    ap.add_argument("--csr", action="store_true", help="also time the vectorised share check (csr_reached)")
    args = ap.parse_args()
    (subjects, questions), locality = rl.fact_subjects(), rl.locality_questions()
    facts = [i for i, s in enumerate(subjects["en"]) if len(fold(s)) >= 4]
    texts = []
    for q in range(args.queries):
        k = (q // 2) % 100
        texts.append(questions[rl.group_languages(k, len(facts))[(q // 2) % 2]][facts[k]] if q % 2
                     else locality[(q // 2) % len(locality)])
    print(f"{'groups':>8}{'overlap':>9}{'postings':>10}{'read':>8}{'reached':>9}{'pass':>7}"
          f"{'  csr ms' if args.csr else ''}  ms per query (one per repetition)")
    for n in (int(s) for s in args.sizes.split(",")):
        subs = {f"g{k}": rl.group_subjects(k, facts, subjects, args.subjects) for k in range(n)}
        ixs = {}
        for ov in (int(s) for s in args.overlaps.split(",")):
            ix = ixs[ov] = SubjectGramIndex(0.5, overlap=ov, edges=True)
            for g, s in subs.items():
                ix.add(g, s)
            ix.supports("warm")
        lookup = (lambda ix, t: ix.end_supports(t)) if args.one_end else (lambda ix, t: ix.supports(t))
        times = {ov: [] for ov in ixs}
        for _ in range(args.reps):
            for ov, ix in ixs.items():
                ts = []
                for t in texts:
                    fold.cache_clear(), _grams.cache_clear()
                    t0 = time.process_time()
                    lookup(ix, t)
                    ts.append(time.process_time() - t0)
                times[ov].append(statistics.median(ts) * 1e3)
        for ov, ix in ixs.items():
            read, reached, passing, csr_ms = [], [], [], []
            csr = CsrShares(ix) if args.csr else None
            for t in texts:
                q = fold(t)
                qg, subjects_reached = ix.reached(q)
                read.append(sum(len(ix._arrays[m].get(x, ())) for m, g in qg.items() for x in g))
                reached.append(len(subjects_reached))
                padded = f" {q}"
                ok = [e.id for e in subjects_reached if len(e.grams & qg[e.n]) >= e.need
                      and (_ends_spelled(e.spec, padded, qg[e.n]) >= (1 if args.one_end else len(e.spec)))]
                passing.append(len(ok))
                if csr is not None:
                    _grams.cache_clear()
                    t0 = time.process_time()
                    got = csr_reached(ix, csr, q)
                    csr_ms.append(time.process_time() - t0)
                    if not set(ok) <= set(got.tolist()):   # the vectorised check misses a subject
                        raise AssertionError(f"csr_reached misses {set(ok) - set(got.tolist())} on {t!r}")
            extra = f"{statistics.median(csr_ms) * 1e3:8.3f}" if csr is not None else ""
            print(f"{n:8d}{ov:9d}{sum(ix.posting_sizes()):10d}{statistics.median(read):8.0f}{statistics.mean(reached):9.1f}"
                  f"{statistics.mean(passing):7.1f}{extra}  " + " ".join(f"{t:.3f}" for t in times[ov]), flush=True)


if __name__ == "__main__":
    main()
