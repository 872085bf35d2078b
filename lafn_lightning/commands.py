"""``lafn`` subcommands that are plain functions (no Trainer of their own).

Each takes documented arguments; ``lafn <command> --help`` lists them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def edit_dataset(argv: list[str]) -> None:
    """Edit every selected group of a dataset, one edit batch per fit, in one process.

    Groups already in the cache are skipped, so an interrupted run resumes where it stopped.
    Any ``lafn fit`` option (``-c CONFIG``, ``--data.*``, ``--trainer.*``, ...) is passed through.
    """
    parser = argparse.ArgumentParser(prog="lafn edit-dataset", description=edit_dataset.__doc__)
    parser.add_argument("--edit_batch_size", type=int, default=4, help="groups per fit (K); default 4")
    parser.add_argument("--redo", action="store_true", help="re-edit groups that are already in the cache")
    own, rest = parser.parse_known_args(argv)
    if own.edit_batch_size < 1:
        parser.error("--edit_batch_size must be >= 1")
    from tqdm.auto import tqdm

    from .cache import EditCache
    from .cli import make_cli

    if not any(a == "--data.groups" or a.startswith("--data.groups=") for a in rest):
        rest = [*rest, "--data.groups", ":"]
    probe = make_cli(rest, run=False)
    cache_dir = Path(probe.config["export"]["cache_dir"])
    groups = probe.datamodule.groups
    done = set()
    if not own.redo and (cache_dir / "manifest.json").exists():
        done = set(EditCache.open(cache_dir).group_ids)
    todo = [g.index for g in groups if g.group_id not in done]
    print(f"[lafn] {len(groups)} groups selected, {len(groups) - len(todo)} already in {cache_dir}, "
          f"{len(todo)} to edit in batches of {own.edit_batch_size}", file=sys.stderr)
    batches = [todo[i:i + own.edit_batch_size] for i in range(0, len(todo), own.edit_batch_size)]
    world = probe.trainer.num_devices * probe.trainer.num_nodes
    if own.edit_batch_size < world:
        raise ValueError(f"--edit_batch_size {own.edit_batch_size} is below the {world} devices: every device "
                         "trains groups of each edit batch")
    if batches and len(batches[-1]) < world:  # every device needs a group of each edit batch
        if len(batches) == 1:
            raise ValueError(f"{len(todo)} group(s) to edit cannot be split over {world} devices: "
                             "select more data.groups or lower trainer.devices")
        batches[-2:] = [batches[-2] + batches[-1]]
    for batch in tqdm(batches, desc="edit batches", unit="batch"):
        make_cli(["fit", *rest, "--data.groups", json.dumps(batch)])


def cache_command(argv: list[str]) -> None:
    """Inspect and maintain an edit cache."""
    from .cache import EditCache, merge_caches

    parser = argparse.ArgumentParser(prog="lafn cache", description=cache_command.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("list", help="one line per cached group");  p.add_argument("cache_dir")
    p = sub.add_parser("show", help="everything stored about one group"); p.add_argument("cache_dir"); p.add_argument("group_id")
    p = sub.add_parser("delete", help="roll back edits (remove groups)"); p.add_argument("cache_dir"); p.add_argument("group_id", nargs="+")
    p = sub.add_parser("merge", help="merge caches (e.g. from several runs or devices) into DEST"); p.add_argument("dest"); p.add_argument("sources", nargs="+")
    p = sub.add_parser("verify", help="check every file against the manifest; exit 1 on problems"); p.add_argument("cache_dir")
    p = sub.add_parser("stats", help="sizes and counts"); p.add_argument("cache_dir")
    args = parser.parse_args(argv)
    if args.action == "merge":
        cache = merge_caches(args.dest, args.sources)
        print(f"merged {len(args.sources)} cache(s) into {args.dest}: {len(cache)} groups")
        return
    cache = EditCache.open(args.cache_dir)
    if args.action == "list":
        for gid in cache.group_ids:
            info = cache.info(gid)
            subjects = info["subjects"]
            print(f"{gid}\t{info['meta'].get('steps', '?')} steps\tneurons {info['located']}\t"
                  f"{subjects.get('en') or next(iter(subjects.values()))}")
    elif args.action == "show":
        print(json.dumps(cache.info(args.group_id), ensure_ascii=False, indent=2))
    elif args.action == "delete":
        cache.delete(args.group_id)
        print(f"deleted {len(args.group_id)} group(s) from {args.cache_dir}")
    elif args.action == "verify":
        problems = cache.verify()
        for problem in problems:
            print(problem)
        print("ok" if not problems else f"{len(problems)} problem(s)")
        if problems:
            sys.exit(1)
    elif args.action == "stats":
        print(json.dumps(cache.stats(), indent=2))
