"""``lafn cache``: inspect and maintain an edit cache (list, show, delete, merge, verify, gc, stats).

    lafn cache verify edit_cache && lafn cache gc edit_cache
"""
from __future__ import annotations

import argparse
import json
import sys

from ..cache import CacheError, EditCache, merge_caches


def cache_command(argv: list[str]) -> None:
    """Inspect and maintain an edit cache."""
    parser = argparse.ArgumentParser(prog="lafn cache", description=cache_command.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("list", help="one line per cached group");  p.add_argument("cache_dir")
    p = sub.add_parser("show", help="everything stored about one group"); p.add_argument("cache_dir"); p.add_argument("group_id")
    p = sub.add_parser("delete", help="roll back edits (remove groups)"); p.add_argument("cache_dir"); p.add_argument("group_id", nargs="+")
    p = sub.add_parser("merge", help="merge caches (e.g. from several runs or devices) into DEST"); p.add_argument("dest"); p.add_argument("sources", nargs="+")
    p.add_argument("--rename", action="store_true", help="keep both groups of an id that names different facts (the later as ID#HASH)")
    p = sub.add_parser("import", help="add the ΔV a failed export kept (lafn-unexported-*.safetensors) to CACHE_DIR")
    p.add_argument("file"); p.add_argument("cache_dir")
    p.add_argument("--value_dtype", default="float16", choices=["float16", "bfloat16"], help="storage dtype of the values")
    p = sub.add_parser("verify", help="check every file against the manifest; exit 1 on problems"); p.add_argument("cache_dir")
    p = sub.add_parser("stats", help="sizes and counts"); p.add_argument("cache_dir")
    p = sub.add_parser("gc", help="remove what an interrupted write left: orphan shards, temporary files, stale router keys"); p.add_argument("cache_dir")
    p.add_argument("--dry_run", action="store_true", help="only list what would be removed")
    args = parser.parse_args(argv)
    if args.action == "merge":
        cache = merge_caches(args.dest, args.sources, rename=args.rename)
        print(f"merged {len(args.sources)} cache(s) into {args.dest}: {len(cache)} groups")
        return
    if args.action == "import":
        from ..cache.rescue import import_unexported

        ids = import_unexported(args.file, args.cache_dir, args.value_dtype)
        print(f"imported {len(ids)} group(s) into {args.cache_dir} (router keys are not kept in {args.file})")
        return
    cache = EditCache.open(args.cache_dir)
    if args.action == "list":
        for gid in cache.group_ids:
            info = cache.info(gid)
            subjects = info["subjects"]
            converged = info["meta"].get("converged")
            mark = "" if converged in (True, None) else " (not converged)"
            print(f"{gid}\t{info['meta'].get('steps', '?')} steps{mark}\tneurons {info['located']}\t"
                  f"{subjects.get('en') or next(iter(subjects.values()))}")
    elif args.action == "show":
        if args.group_id not in cache:
            raise CacheError(f"{args.cache_dir}: no group {args.group_id!r} in the cache (lafn cache list shows them)")
        print(json.dumps(cache.info(args.group_id), ensure_ascii=False, indent=2))
    elif args.action == "delete":
        unknown = [g for g in args.group_id if g not in cache]
        if unknown:
            raise CacheError(f"{args.cache_dir}: no group(s) {unknown} in the cache; nothing deleted")
        cache.delete(args.group_id)
        print(f"deleted {len(args.group_id)} group(s) from {args.cache_dir}")
    elif args.action == "verify":
        problems = cache.verify()
        for problem in problems:
            print(problem)
        print("ok" if not problems else f"{len(problems)} problem(s)")
        if problems:
            sys.exit(1)
    elif args.action == "gc":
        removed = cache.gc(dry_run=args.dry_run)
        for path in removed:
            print(path)
        print(f"{'would remove' if args.dry_run else 'removed'} {len(removed)} file(s)")
    elif args.action == "stats":
        print(json.dumps(cache.stats(), indent=2))
