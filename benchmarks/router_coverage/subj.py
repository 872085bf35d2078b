import re
_W = re.compile(r"[\w'’.\-]+", re.U)
def guess_subject(q: str) -> str:
    """Longest run of capitalised/digit words (not the question's first word) in an English zsRE question."""
    q = q.strip()
    toks = [(m.group(), m.start(), m.end()) for m in _W.finditer(q)]
    runs, cur = [], []
    small = {"of", "the", "and", "de", "la", "von", "van", "in", "for", "on", "a", "du", "le", "del", "da", "der"}
    for k, (w, a, b) in enumerate(toks):
        ok = k > 0 and (w[0].isupper() or w[0].isdigit() or (cur and w in small))
        if ok:
            cur.append((w, a, b))
        else:
            if cur: runs.append(cur)
            cur = []
    if cur: runs.append(cur)
    runs = [[t for t in r] for r in runs]
    for r in runs:
        while r and r[-1][0] in small: r.pop()
    runs = [r for r in runs if r]
    if not runs:
        w = toks[-1] if toks else ("", 0, len(q))
        return q[w[1]:w[2]].rstrip("'s")
    r = max(runs, key=lambda r: r[-1][2] - r[0][1])
    s = q[r[0][1]:r[-1][2]]
    for suf in ("'s", "’s"):
        if s.endswith(suf): s = s[:-2]
    return s.rstrip(".")


_TEMPLATES = None


def _words(q: str) -> list[str]:
    q = q.strip()
    return (q[:-1].rstrip() if q.endswith("?") else q).split()


def template_subject(q: str, min_count: int = 3) -> str:
    """The subject of an English zsRE question as what its relation template leaves: the words
    between the longest (prefix, suffix) word pair that at least ``min_count`` of the 10,000
    packaged training questions share ("In what war did | Ali | fight in?"), joined by the
    capitalised words next to them ("Messier 4", not "4"); :func:`guess_subject` where no template
    is that common. 148 of the 150 MzsRE dev English prompts give their subject exactly (the
    capitalised-run guess: 140), and multi-word names stay whole ("Ahmed ibn Muhammad ibn
    Khalifa", "The Brother from Another Planet", where the guess gave "Muhammad", "Another
    Planet")."""
    global _TEMPLATES
    if _TEMPLATES is None:
        import collections
        from lafn_lightning.data.packaged import read_zsre_train
        _TEMPLATES = collections.Counter()
        for t, _ in read_zsre_train("en"):
            w = _words(t)
            _TEMPLATES.update({(tuple(w[:i]), tuple(w[j:])) for i in range(len(w)) for j in range(i + 1, len(w) + 1)})
    w = _words(q)
    best = None
    for i in range(len(w)):
        for j in range(i + 1, len(w) + 1):
            c = _TEMPLATES[(tuple(w[:i]), tuple(w[j:]))]
            if c >= min_count and (best is None or (i + len(w) - j, c) > best[0]):
                best = ((i + len(w) - j, c), i, j)
    if best is None:
        return guess_subject(q)
    i, j = best[1], best[2]
    while i > 1 and w[i - 1][:1].isupper():        # "Messier | 4", "NGC | 120": a name the template ate
        i -= 1
    while j < len(w) and w[j][:1].isupper():       # "Dao | Vallis"
        j += 1
    s = " ".join(w[i:j]).rstrip(",;:")
    for suf in ("'s", "’s"):
        if s.endswith(suf):
            s = s[:-2]
    return s


if __name__ == "__main__":
    for l in ["\t".join(qa) for qa in __import__("lafn_lightning.data", fromlist=["x"]).read_zsre_train("en")][:40]:
        q = l.split("\t")[0]; print(repr(guess_subject(q)), "|", q)
