"""`python -m fedfm.scenarios validate|generate` — check site files, write a split to .npz."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedfm.scenarios import SPLITS, ConfigError, load_federation, load_site, read_yaml


def _validate(paths: list[str]) -> int:
    bad = 0
    for p in paths:
        try:
            data = read_yaml(p)  # one line naming the file when unreadable, not text or malformed
            is_fed = isinstance(data, dict) and "train_sites" in data
            obj = load_federation(p) if is_fed else load_site(p)
            kind = f"federation ({len(obj.train_sites)} train, {len(obj.heldout_sites)} held out)" if is_fed \
                else f"site {obj.name} ({obj.environment}, {obj.sub6.carrier_ghz} GHz)"
            print(f"ok  {p}: {kind}")
        except ConfigError as e:
            print(f"error  {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def _generate(args) -> int:
    from fedfm.data import ARRAY_NAMES, generate_split, load_split

    spec = load_site(args.site)
    if args.samples is not None and args.samples <= 0:
        raise ConfigError(f"--samples = {args.samples} is not allowed; expected a positive integer")
    if Path(args.out).is_dir() or not Path(args.out).parent.is_dir() and Path(args.out).parent.exists():
        raise ConfigError(f"--out {args.out}: expected a .npz file path in a folder (checked before generating)")
    if args.no_cache:
        arrays = generate_split(spec, args.split, args.samples)
    else:
        arrays = load_split(spec, args.split, args.cache_dir, args.samples)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp.npz")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **{k: arrays[k] for k in ARRAY_NAMES + ("codebook",)})
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--out {out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {out}: {spec.name} {args.split}, {arrays['h_sub6'].shape[0]} samples, "
          f"h_sub6 {tuple(arrays['h_sub6'].shape)}, h_mmwave {tuple(arrays['h_mmwave'].shape)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedfm.scenarios", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check site/federation YAML files")
    v.add_argument("paths", nargs="+")
    g = sub.add_parser("generate", help="synthesise one split of a site to an .npz")
    g.add_argument("site")
    g.add_argument("--split", choices=SPLITS, default="test")
    g.add_argument("--samples", type=int, default=None, help="default: the site's sample count for the split")
    g.add_argument("--out", required=True)
    g.add_argument("--cache-dir", default=None, help="default: $FEDFM_CACHE_DIR or ~/.cache/fedfm")
    g.add_argument("--no-cache", action="store_true", help="generate without reading or writing the cache")
    args = ap.parse_args(argv)
    try:
        return _validate(args.paths) if args.cmd == "validate" else _generate(args)
    except ValueError as e:  # ConfigError, and a cache that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
