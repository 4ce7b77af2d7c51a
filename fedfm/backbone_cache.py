"""The server's central pretraining of the backbone, cached across runs by everything it
depends on (``<cache>/backbones/<key>/``): the sites' train files, the model, the recipe, the
hardware, the package versions and fedfm's own source. The same key gives the same bits
(measured byte-identical across runs on CPU, RESULTS.md "Two caches"), so a run with the same
inputs copies the backbone an earlier one made instead of pretraining again; a damaged entry is
named and pretrained again; the cache keeps the most recently used entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from fedfm.config import RunConfig
from fedfm.data import cache_root, load_split
from fedfm.federated import build_run_model, model_config, package_versions, resolve_device
from fedfm.scenarios import SiteSpec, derive_seed, spec_hash


def pretrain_key(cfg: RunConfig, train_specs: list[SiteSpec], num_beams: int, device: str) -> dict:
    """(The sites' train splits loaded first, by :func:`load_split`.) Everything the server's
    central pretraining depends on: same key, same backbone bits
    (seeded generators, one process; measured byte-identical across runs on CPU, RESULTS.md;
    on CUDA a reused entry is a backbone of the same recipe, not checked to the bit). The
    sites' train splits are named by their cache files' sha256 (the data cache is keyed by the
    spec alone, so data made again after a change of the generator's code reads as other data),
    and the hardware by its CPU's instruction set and GPU (a cache folder may be shared)."""
    import platform

    from fedfm.data import split_path
    from fedfm.files import package_digest
    from fedfm.train import usable_cores

    data = []
    for spec in train_specs:  # the caller has loaded them (made, or checked against their sidecars)
        sidecar = split_path(spec, "train", cfg.cache_dir or None).with_suffix(".json")
        try:
            digest = json.loads(sidecar.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # changed since load_split read it
            raise ValueError(f"{sidecar}: unreadable data sidecar ({type(e).__name__}: {e}); "
                             f"another process may be rewriting the cache: run again") from None
        data.append([spec.name, spec_hash(spec), digest])
    hardware = {"machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
                "cpu_model": _cpu_model(), "cores": usable_cores()}
    if device.startswith("cuda"):
        hardware["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return {"sites": data, "model": model_config(cfg, num_beams).to_dict(),
            "steps": cfg.pretrain_steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "device": device, "hardware": hardware, "versions": package_versions(),
            "fedfm_source": package_digest()}


def _cpu_model() -> str:
    """The CPU's model name (Linux), "" elsewhere: BLAS kernels differ between vendors."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


BACKBONE_FILES = ("backbone.safetensors", "backbone.json")  # the checkpoint and its sidecar (fedfm.model)
BACKBONE_CACHE_KEEP = 8  # complete entries kept under <cache>/backbones/: the most recently used


def _prune_backbones(root: Path, current: Path) -> list[Path]:
    """Remove all but the :data:`BACKBONE_CACHE_KEEP` most recently used complete entries
    under ``root`` (used: their ``key.json``'s mtime, which a run sets when it stores or reuses
    one), never ``current``; returns what it removed. Any code change makes a new key, so
    without this the cache grows by one backbone per change (4 MB for ``tiny``, ~80 MB for
    ``base``). An entry without ``key.json`` (another run may be writing it) is left alone. A
    cache that cannot be listed or removed from is left as it is: pruning is housekeeping."""
    try:
        entries = [p for p in root.iterdir() if p != current and (p / "key.json").is_file()]
        entries.sort(key=lambda p: (p / "key.json").stat().st_mtime, reverse=True)
    except OSError:
        return []
    removed = []
    for p in entries[max(BACKBONE_CACHE_KEEP - 1, 0):]:   # ``current`` is one of the kept
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


def _mark_used(store: Path) -> None:
    """Set the entry's ``key.json`` mtime to now (what :func:`_prune_backbones` orders by) and
    prune the cache around it."""
    try:
        os.utime(store / "key.json")
    except OSError:
        return
    removed = _prune_backbones(store.parent, store)
    if removed:
        print(f"fedfm: {store.parent}: removed {len(removed)} least recently used cached backbone(s) "
              f"(keeping {BACKBONE_CACHE_KEEP}): {', '.join(p.name for p in removed)}", flush=True)


def _sound_backbone(folder: Path, key: dict) -> bool:
    """Whether ``folder`` holds a backbone made under ``key`` that loads (its sha256 against
    its sidecar, finite values); a damaged one is reported on stderr (and pretrained again by
    the caller), never used."""
    from fedfm.model import load_backbone

    if not (folder / "key.json").exists():
        return False
    try:
        if json.loads((folder / "key.json").read_text()) != json.loads(json.dumps(key)):
            raise ValueError("its key.json records other inputs")  # (the dumps: tuples read back as lists)
        load_backbone(folder / BACKBONE_FILES[0])
        return True
    except Exception as e:  # noqa: BLE001 (safetensors' own error is a plain Exception): pretraining is always safe
        print(f"fedfm: {folder}: cached backbone unusable ({e}); pretraining again", file=sys.stderr, flush=True)
        return False


def _copy_atomic(src: Path, dst: Path) -> None:
    """``src`` to ``dst`` through a temp file of its own in ``dst``'s folder: a reader (or a
    second writer: two runs may share a cache) never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store_backbone(out_dir: Path, store: Path, key: dict) -> None:
    """Copy the pretrained backbone into the cache; key.json last, so an entry without it is
    never read. A cache that cannot be written costs the next run its pretraining, no more."""
    try:
        store.mkdir(parents=True, exist_ok=True)
        (store / "key.json").unlink(missing_ok=True)
        for name in BACKBONE_FILES:
            _copy_atomic(out_dir / name, store / name)
        _copy_atomic(out_dir / "key.json", store / "key.json")
    except OSError as e:
        print(f"fedfm: {store}: backbone not cached ({e})", file=sys.stderr, flush=True)
        return
    _mark_used(store)


def pretrain_backbone_centrally(cfg: RunConfig, train_specs: list[SiteSpec], num_beams: int,
                                out_dir: Path) -> tuple[str, str]:
    """A small backbone pretrained by masked reconstruction on the federation's own
    training sites' train splits, pooled at the server (issue 4 accepts this for the
    default run when the report says so; ``stage=pretrain`` is the federated way).

    Returns (its path in ``out_dir``, the cache entry it was copied from or ""). The same
    inputs (:func:`pretrain_key`: sites, model, steps, seed, versions, fedfm's source) give
    the same bits, so a run reuses ``<cache>/backbones/<key hash>/`` when an earlier run made
    it, and keeps its own copy either way; delete that folder to pretrain again. The cache
    keeps the :data:`BACKBONE_CACHE_KEEP` most recently used entries."""
    from fedfm.model import base_model, save_backbone
    from fedfm.train import all_cores, pretrain

    device = resolve_device(cfg.device)
    arrays = [load_split(spec, "train", cfg.cache_dir or None) for spec in train_specs]
    key = pretrain_key(cfg, train_specs, num_beams, device)
    store = cache_root(cfg.cache_dir) / "backbones" / hashlib.sha256(
        json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = out_dir / BACKBONE_FILES[0]
    if _sound_backbone(store, key):
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in (*BACKBONE_FILES, "key.json"):
                shutil.copyfile(store / name, out_dir / name)
        except OSError as e:  # an entry removed or rewritten meanwhile: pretrain
            print(f"fedfm: {store}: cached backbone not copied ({e}); pretraining again", file=sys.stderr,
                  flush=True)
        else:
            if _sound_backbone(out_dir, key):  # the copy, checked as the entry was
                _mark_used(store)
                return str(path), str(store)
    model = build_run_model(cfg, num_beams, None, device)
    with all_cores():  # before round 1: the sites are idle
        pretrain(model, list(zip(train_specs, arrays)), steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
                 lr=cfg.lr, seed=derive_seed(cfg.seed, "pretrain"), device=device)
    save_backbone(path, base_model(model).backbone, model_config(cfg, num_beams),
                  meta={"source": "central", "sites": [s.name for s in train_specs], "steps": cfg.pretrain_steps})
    (out_dir / "key.json").write_text(json.dumps(key, indent=1))  # the run keeps what it was made under
    _store_backbone(out_dir, store, key)
    return str(path), ""
