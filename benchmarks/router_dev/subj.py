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
if __name__ == "__main__":
    for l in ["\t".join(qa) for qa in __import__("lafn_lightning.data", fromlist=["x"]).read_zsre_train("en")][:40]:
        q = l.split("\t")[0]; print(repr(guess_subject(q)), "|", q)
