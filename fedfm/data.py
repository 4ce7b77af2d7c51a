"""SiteData: a site's channels, generated once and kept on the site's own disk.

Each (site, split) is cached as ``<cache>/<name>-<spec hash>/<split>-<samples>.npz`` with
a JSON sidecar holding the file's SHA-256. A changed spec changes the hash (so the data
is regenerated); a corrupt or truncated file fails the checksum, is reported on stderr
and regenerated, never used.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfm.files import sha256_file
from fedfm.scenarios import SPLITS, SiteSpec, derive_seed, spec_hash, spec_to_dict, split_seed

# Arrays of one split, in the order of the `generate` CLI contract (issue #2).
ARRAY_NAMES = ("h_sub6", "h_mmwave", "distance_m", "pathloss_db", "los", "speed_mps", "best_beam")
CHUNK = 256  # samples per Sionna call; each chunk has its own derived seed


def first_samples(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """One split's arrays cut to the first ``n`` samples (the per-site codebook kept whole)."""
    return {k: (v[:n] if k in ARRAY_NAMES else v) for k, v in arrays.items()}


def default_cache_dir() -> Path:
    env = os.environ.get("FEDFM_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedfm"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder a site uses: ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()


def site_cache_dir(spec: SiteSpec, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / f"{spec.name}-{spec_hash(spec)}"


def split_path(spec: SiteSpec, split: str, cache_dir: str | Path | None = None, samples: int | None = None) -> Path:
    """Where a split's arrays are cached: ``<cache>/<site>-<spec hash>/<split>-<samples>.npz``."""
    n = samples if samples is not None else getattr(spec.samples, split)
    return site_cache_dir(spec, cache_dir) / f"{split}-{n}.npz"


def generate_split(spec: SiteSpec, split: str, samples: int | None = None) -> dict[str, np.ndarray]:
    """Synthesise one split with Sionna (no cache). Same spec/split/samples → same bits."""
    from fedfm.channels.synthesis import SiteChannelGenerator  # Sionna import is slow: only when needed

    n = samples if samples is not None else getattr(spec.samples, split)
    gen = SiteChannelGenerator(spec)
    root = split_seed(spec, split)
    chunks = [gen.generate(min(CHUNK, n - i), derive_seed(root, "chunk", i // CHUNK)) for i in range(0, n, CHUNK)]
    # C order, as the cache file reads back: the generator's channels are transposed views, and
    # NumPy reductions over another memory layout sum in another order, so a run that generated
    # a site's data would score it a few ulps apart from every later run that loads it
    out = {k: np.ascontiguousarray(np.concatenate([c[k] for c in chunks])) for k in chunks[0]}
    out["codebook"] = np.ascontiguousarray(gen.codebook)
    return out


def _read_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if absent; raises ValueError if present but unusable."""
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        return None
    try:  # the sidecar at fault, not the arrays: name it
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{meta_path}: corrupt cache sidecar ({type(e).__name__}: {e})") from None
    digest = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(digest, str):
        raise ValueError(f"{meta_path}: corrupt cache sidecar (no `sha256` string)")
    try:
        if sha256_file(path) != digest:
            raise ValueError("checksum mismatch (truncated or modified)")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt cache file ({type(e).__name__}: {e})") from None
    missing = set(ARRAY_NAMES + ("codebook",)) - set(arrays)
    if missing:
        raise ValueError(f"{path}: corrupt cache file (missing arrays {sorted(missing)})")
    return arrays


def _write_atomic(path: Path, arrays: dict[str, np.ndarray], spec: SiteSpec, split: str) -> None:
    """Write npz then its sidecar, each via a temp file + rename: never a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
        meta = {"sha256": sha256_file(Path(tmp)), "split": split, "spec_hash": spec_hash(spec),
                "seed": split_seed(spec, split), "spec": spec_to_dict(spec)}
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C: leave no half-written temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    tmp_meta = path.with_suffix(".json.tmp")
    try:
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, path.with_suffix(".json"))
    except BaseException:  # the npz without its sidecar reads as not cached, and is made again
        tmp_meta.unlink(missing_ok=True)
        raise


def load_split(spec: SiteSpec, split: str, cache_dir: str | Path | None = None,
               samples: int | None = None) -> dict[str, np.ndarray]:
    """Generate-or-load one split of a site. See the module docstring for caching."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    n = samples if samples is not None else getattr(spec.samples, split)
    path = split_path(spec, split, cache_dir, n)
    try:
        cached = _read_cached(path)
    except ValueError as e:
        print(f"fedfm: {e}; regenerating", file=sys.stderr)
        cached = None
    if cached is not None:
        return cached
    with _GENERATING:  # one split at a time in a process: generation seeds Sionna's global config
        arrays = generate_split(spec, split, n)
        try:
            _write_atomic(path, arrays, spec, split)
        except OSError as e:  # a cache dir that is a file, read-only or full, a sidecar path taken: one line naming it
            where = e.filename2 or e.filename or path.parent
            raise ValueError(f"{where}: cannot write the site's data cache ({e.strerror or e}); "
                             f"choose a writable cache folder (--cache-dir, cache-dir= or FEDFM_CACHE_DIR)") from None
    return arrays


# load_split may run on several threads (server/evaluator.py prepares its sites in parallel)
_GENERATING = threading.RLock()  # reentrant: a generation that loaded another split would not deadlock


def _fill_split(spec: SiteSpec, split: str, cache_dir) -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: N workers on N cores
    load_split(spec, split, cache_dir)


def fill_caches(specs, cache_dir: str | Path | None = None, jobs: int = 1) -> None:
    """Generate every split of every site with no cache file yet, ``jobs`` worker processes at a time,
    one (site, split) each, largest first. Generation is host work on one core per process,
    and each split has its own seed, so the arrays are those of :func:`load_split` one after
    another. Raises the first worker's ValueError (e.g. an unwritable cache folder)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # a cached file is left to the caller's load_split, which checks it: a worker would read it in full only to return
    work = sorted(((spec, split) for spec in specs for split in SPLITS if not split_path(spec, split, cache_dir).exists()),
                  key=lambda w: -getattr(w[0].samples, w[1]))
    if not work:
        return
    # spawn, not fork: a forked child would inherit torch's thread pools and Sionna's state mid-use
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(_fill_split, spec, split, cache_dir) for spec, split in work]:
            f.result()


@dataclass
class SiteData:
    """A site's spec and its splits: ``splits[split][array_name]`` (see ARRAY_NAMES)."""

    spec: SiteSpec
    splits: dict[str, dict[str, np.ndarray]]

    @property
    def name(self) -> str:
        return self.spec.name


def load_site_data(spec: SiteSpec, splits: tuple[str, ...] = SPLITS,
                   cache_dir: str | Path | None = None) -> SiteData:
    return SiteData(spec, {s: load_split(spec, s, cache_dir) for s in splits})


def summarize(site: SiteData) -> dict:
    """One row of the dataset summary: shapes, label statistics per split."""
    s = site.spec
    row = {"site": s.name, "env": s.environment, "los_mode": s.los_mode, "fc_ghz": s.sub6.carrier_ghz,
           "N": s.sub6.antennas, "K": s.sub6.subcarriers, "T+P": s.num_slots}
    for split, a in site.splits.items():
        row[f"{split}_n"] = int(a["h_sub6"].shape[0])
    a = site.splits.get("train") or next(iter(site.splits.values()))
    row.update(los_frac=float(a["los"].mean()), dist_m_mean=float(a["distance_m"].mean()),
               pl_db_mean=float(a["pathloss_db"].mean()), speed_mps_mean=float(a["speed_mps"].mean()),
               beams_used=int(np.unique(a["best_beam"]).size))
    return row
