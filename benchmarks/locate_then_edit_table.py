"""Usage: python benchmarks/locate_then_edit_table.py RUN_DIR

Markdown table (F1 / EM per metric and language, wall times, peak RSS) of the
``<method>.results.json`` files written by ``benchmarks/locate_then_edit.py`` into RUN_DIR."""
import json
import sys
from pathlib import Path

rows = []
for path in sorted(Path(sys.argv[1]).glob("*.results.json")):
    r = json.loads(path.read_text())
    langs = r["languages"]
    for metric, cells in r["scores"].items():
        pre = " | ".join(str(cells[l].get("pre_f1", "-")) for l in langs)
        rows.append(f"| {r['method']} | {metric} | " + " | ".join(f"{cells[l]['f1']} / {cells[l]['em']}" for l in langs)
                    + f" | {pre} |")
    rows.append(f"| {r['method']} | edit {r['edit_s']} s, eval {r['eval_s']} s, peak RSS {r['peak_rss_mb']} MB, "
                f"ranks {r['ranks']}, groups {r['groups']} | | | | |")
print("| method | metric | " + " | ".join(f"{l} F1 / EM" for l in langs) + " | " + " | ".join(f"{l} pre-edit F1" for l in langs) + " |")
print("| --- | --- |" + " --- |" * (2 * len(langs)))
print("\n".join(rows))
