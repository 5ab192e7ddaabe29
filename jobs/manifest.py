"""``cvnet manifest``: an image manifest (Parquet) from a GLDv2 tree, a revisitop dataset or a
folder of images, without writing Python.

    cvnet manifest gldv2 --root R [--split train_clean|train|index|test] [--layout folder|tar] --out M
    cvnet manifest revisitop --root R --name roxford5k [--queries] [--distractors revisitop1m.txt] --out M
    cvnet manifest folder --root DIR --out M

URIs in the manifest are absolute: a local root is made absolute (remote roots stay URIs), so
the manifest reads the same on any machine that sees the files. It prints the rows per split,
the files found that are not in the manifest (not in the split's CSV or the ground truth, not
images) and the listed images without a file.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from jobs.cli import entrypoint

HELP = "build an image manifest from a GLDv2 tree, a revisitop dataset or a folder of images"
EXAMPLES = 3  # file names shown per count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.data.gldv2 import LAYOUTS, SPLITS

    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    gldv2 = sources.add_parser("gldv2", help="a GLDv2 split: the official CSVs + images")
    gldv2.add_argument("--root", required=True, help="GLDv2 root (train.csv, train/, ...)")
    gldv2.add_argument("--split", default="train_clean", choices=sorted(SPLITS))
    gldv2.add_argument("--layout", default="folder", choices=LAYOUTS,
                       help="folder: <subset>/a/b/c/<id>.jpg; tar: members of <subset>/images_*.tar")
    gldv2.add_argument("--skip-md5", action="store_true",
                       help="tar layout: do not check shards against their md5 lists (which reads every shard)")
    revisitop = sources.add_parser("revisitop", help="a revisitop dataset (gnd_<name>.pkl + jpg/)")
    revisitop.add_argument("--root", required=True, help="dataset folder")
    revisitop.add_argument("--name", required=True, help="dataset name, e.g. roxford5k")
    revisitop.add_argument("--queries", action="store_true",
                           help="also the queries (split query), each with its crop box bbx")
    revisitop.add_argument("--distractors", default=None, metavar="LIST",
                           help="also the R1M distractors named in LIST (revisitop1m.txt; images in "
                                "its folder's jpg/)")
    folder = sources.add_parser("folder", help="every image under a folder (recursive)")
    folder.add_argument("--root", required=True, help="folder; image ids are the relative paths "
                                                      "without suffix (a/b/c.jpg -> a/b/c)")
    folder.add_argument("--split", default="folder", help="split name of every row")
    for sub in (gldv2, revisitop, folder):
        sub.add_argument("--out", required=True, help="manifest URI to write (.parquet)")


def _absolute(uri: str) -> str:
    from cvnet.storage import is_remote

    return uri if is_remote(uri) else os.path.abspath(uri)


def _gldv2(args: argparse.Namespace, root: str):
    from cvnet.data.gldv2 import gldv2_inventory

    table, found = gldv2_inventory(root, args.split, args.layout, verify_md5=not args.skip_md5)
    return table, found, f"not in {args.split}.csv"


def _revisitop(args: argparse.Namespace, root: str):
    import pyarrow as pa

    from cvnet.data.manifest import list_files
    from cvnet.data.revisitop import r1m_manifest, revisitop_manifest
    from cvnet.storage import join

    tables = [revisitop_manifest(root, args.name, queries=args.queries)]
    found = list_files(join(root, "jpg"))
    listed = f"gnd_{args.name}.pkl"
    if args.distractors:
        r1m_root, list_name = _absolute(args.distractors).rsplit("/", 1)
        tables.append(r1m_manifest(r1m_root, list_name))
        found += list_files(join(r1m_root, "jpg"))
        listed += f" or {list_name}"
    return pa.concat_tables(tables), found, f"not in {listed}" + ("" if args.queries else " database")


def _folder(args: argparse.Namespace, root: str):
    from cvnet.data.manifest import IMAGE_SUFFIXES, folder_manifest

    table, others = folder_manifest(root, args.split)
    return table, table.column("uri").to_pylist() + others, f"not images ({' '.join(IMAGE_SUFFIXES)})"


SOURCES = {"gldv2": _gldv2, "revisitop": _revisitop, "folder": _folder}


def _examples(uris: list[str]) -> str:
    from cvnet.storage import redact

    shown = ", ".join(redact(u) for u in uris[:EXAMPLES])
    return f": {shown}{', ...' if len(uris) > EXAMPLES else ''}" if uris else ""


def run(args: argparse.Namespace) -> int:
    from cvnet.data.manifest import write_manifest
    from cvnet.storage import redact

    root, out = _absolute(args.root), _absolute(args.out)
    table, found, reason = SOURCES[args.source](args, root)
    listed = table.column("uri").to_pylist()
    present, known = set(found), set(listed)
    unlisted = [u for u in found if u not in known]
    missing = [u for u in listed if u not in present]
    write_manifest(table, out)
    splits = Counter(table.column("split").to_pylist())
    print(f"wrote {table.num_rows} images to {redact(out)} ("
          + ", ".join(f"{split} {n}" for split, n in splits.items()) + ")")
    print(f"found {len(found)} files under {redact(root)}; {len(unlisted)} not in the manifest "
          f"({reason}){_examples(unlisted)}")
    print(f"{len(missing)} listed images without a file{_examples(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))
