"""Subject-matching coverage on the MzsRE dev subset, and find() cost vs. number of groups.

    python benchmarks/match_coverage_dev.py                 # coverage tables, all matchers
    python benchmarks/match_coverage_dev.py --misses ru     # list the misses of one language
    python benchmarks/match_coverage_dev.py --speed         # find() time with 100/10k/100k groups

Coverage (the counting is :func:`lafn_lightning.evaluation.match_report.measure`, also behind
``lafn match-report``): all 150 records are registered as groups ``mzsre:{i}`` whose subjects are
the record's 12 language subjects.  For each language and probe kind (src, rephrase, portability
question) "found" is the share of texts in which ``find`` returns the record's own group; "other"
is the share in which it returns some other group.  For ``loc`` (unrelated locality probes, with
the English "nq question: " tag removed by the loader) "false" is the share of texts in which any
group is returned.  This script adds the per-probe breakdown and the misses to the report.
"""

from __future__ import annotations

import argparse
import random
import string
import time
from pathlib import Path


from lafn_lightning.data import default_dataset, load_groups
from lafn_lightning.evaluation.match_report import PROBES, LanguageCoverage, measure
from lafn_lightning.text.matching import MATCHERS, SubjectMatcher



def coverage(groups, mode: str, misses: str | None = None) -> None:
    """Per-probe table of one matcher (counts from :func:`lafn_lightning.evaluation.match_report.measure`)."""
    per_lang = measure(groups, mode)
    header = f"{'lang':5}" + "".join(f"{p[:5] + ' found':>12}{'other':>7}" for p in PROBES)
    print(f"\n== {mode} ==\n{header}{'all found':>11}{'loc false':>11}")
    total = LanguageCoverage()
    for lang, cov in per_lang.items():
        row = f"{lang:5}" + "".join(
            f"{100 * cov.found[p] / max(cov.n[p], 1):12.1f}{100 * cov.other[p] / max(cov.n[p], 1):7.1f}"
            for p in PROBES)
        print(f"{row}{100 * cov.found_share:11.1f}{100 * (cov.false_match_share or 0):11.1f}")
        if misses == lang:
            for gid, probe, subject, text in cov.misses:
                print(f"  miss {lang} {gid:10} {probe:11} {subject!r:45} | {text}")
        if misses in (lang, "loc"):
            for hits, text in cov.loc_hits:
                print(f"  loc  {lang} {[(m.group_id, m.subject) for m in hits]} | {text}")
        total += cov
    print(
        f"{'all':5} found {100 * total.found_share:.1f}%, "
        f"other group {100 * sum(total.other.values()) / total.n_questions:.2f}%, "
        f"loc false {100 * total.false_match_share:.2f}% ({total.loc_false}/{total.loc_n})"
    )


def random_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9)))


def speed(sizes=(100, 10_000, 100_000), queries: int = 2000, seed: int = 0) -> None:
    rng = random.Random(seed)
    subjects = [" ".join(random_word(rng) for _ in range(rng.randint(1, 3))).title()
                for _ in range(max(sizes))]
    texts = []
    for q in range(queries):
        words = [random_word(rng) for _ in range(rng.randint(8, 16))]
        if q % 2:  # half the queries contain a subject that is registered at every size
            words.insert(rng.randrange(len(words)), subjects[rng.randrange(min(sizes))])
        texts.append(" ".join(words) + "?")
    print(f"\nfind() cost, {queries} queries of 8-17 words, half containing a registered subject")
    print(f"{'mode':11}" + "".join(f"{n:>12,}" for n in sizes) + f"{'ratio':>8}   (µs/query)"
          f"{'build ' + format(max(sizes), ','):>16}")
    for mode in MATCHERS:
        cost = []
        for n in sizes:
            t0 = time.perf_counter()
            matcher = SubjectMatcher({f"g{i}": [subjects[i]] for i in range(n)}, mode=mode)
            matcher.find("warm up")  # builds the automaton
            build = time.perf_counter() - t0
            for t in texts:  # warm the caches (per-word folding/stemming is memoised)
                matcher.find(t)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                hits = sum(len(matcher.find(t)) for t in texts)
                best = min(best, time.perf_counter() - t0)
            assert hits >= queries // 2, (mode, n, hits)
            cost.append(1e6 * best / queries)
        print(f"{mode:11}" + "".join(f"{c:12.1f}" for c in cost) + f"{cost[-1] / cost[0]:8.2f}"
              f"{build:14.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_dataset(),
                        help="MzsRE folder (default: the dev records shipped in the package)")
    parser.add_argument("--mode", choices=MATCHERS, action="append")
    parser.add_argument("--misses", help="print the misses of this language ('loc': loc hits)")
    parser.add_argument("--speed", action="store_true", help="only the find() cost benchmark")
    args = parser.parse_args()
    if args.speed:
        speed()
        return
    groups = load_groups(args.data)
    for mode in args.mode or MATCHERS:
        coverage(groups, mode, args.misses)


if __name__ == "__main__":
    main()
