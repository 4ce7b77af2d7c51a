"""The run folder: everything a federated run writes, and resuming from it.

    runs/<run-id>/
      config.json            resolved run config, federation, seeds, backbone hash, versions
      metrics.jsonl          one line per round × site × task (central evaluation), plus
                             per-site local training losses (``source: "train"``)
      baselines.json         classical baselines per site × task (computed once)
      ledger.jsonl           bytes down/up per site per round, adapter vs full-model size
      events.jsonl           site errors and rejected updates, by site name
      checkpoints/round-NNN/ adapter.safetensors, strategy.safetensors, state.json (RNG, round)
      samples/               per-sample test errors (fedfm.metrics.sample_errors), keys
                             "site/task": round-NNN.safetensors (central evaluation),
                             baseline.safetensors, and local_only / centralized.safetensors
                             from scripts/compare.py: what its paired bootstrap resamples
      report.md, report.json, plots/*.png   (fedfm.report)
      finetune/              scripts/finetune_site.py: <name>.json (before/after table) and
                             <name>.safetensors (the site's two models and which task uses which)

A checkpoint folder is written under a temporary name and renamed when complete, so a
``round-NNN`` folder is always whole. Resuming truncates the JSONL files to that round,
so an interrupted round leaves no duplicate lines.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINTS = "checkpoints"
JSONL_FILES = ("metrics.jsonl", "ledger.jsonl", "events.jsonl")
_RUN_FOLDER = "expected a run folder written by scripts/run_federation.py"
_MISSING = object()


def read_jsonl(path: str | Path, *, drop_torn_tail: bool = False) -> list[dict]:
    """Rows of a JSON-lines file ([] when it does not exist). ValueError naming the file and
    line when a line is not a JSON object. ``drop_torn_tail``: a last line that has no newline
    and does not parse is the remains of an interrupted append (resume drops it)."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot be read ({e})") from None
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if drop_torn_tail and i == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{p}: line {i} is not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}: line {i} is not a JSON object")
        rows.append(row)
    return rows


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content, ``default`` when it does not exist; ValueError naming the file
    when it cannot be read or parsed."""
    p = Path(path)
    if not p.exists():
        return default
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def read_run_config(run_dir: str | Path) -> dict:
    """``run_dir``'s config.json. ValueError naming the file when it is missing or not a JSON
    object: the scripts print a ValueError as their one-line error."""
    p = Path(run_dir) / "config.json"
    try:
        conf = read_json(p, _MISSING)
    except ValueError as e:
        raise ValueError(f"{e}; {_RUN_FOLDER}") from None
    if conf is _MISSING:
        raise ValueError(f"{p}: not found; {_RUN_FOLDER}")
    if not isinstance(conf, dict):
        raise ValueError(f"{p}: not a JSON object; {_RUN_FOLDER}")
    return conf


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())  # a NaN np.float32 is a NaN float
    if isinstance(x, float) and not np.isfinite(x):
        return None  # JSON has no NaN/inf; None reads as "not available"
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, sort_keys=False))
    os.replace(tmp, p)


SAMPLES = "samples"


def samples_path(run_dir: str | Path, name: str) -> Path:
    """``run_dir/samples/NAME.safetensors`` (NAME: round-NNN, baseline, local_only, centralized)."""
    return Path(run_dir) / SAMPLES / f"{name}.safetensors"


def write_samples(path: str | Path, errors: dict[str, dict[str, np.ndarray]]) -> None:
    """Atomic write of {site: {task: per-sample errors}} as float64 tensors "site/task"."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file({f"{site}/{task}": np.ascontiguousarray(v, dtype=np.float64)
               for site, tasks in errors.items() for task, v in tasks.items()}, str(tmp))
    os.replace(tmp, p)


def read_samples(path: str | Path) -> dict[str, dict[str, np.ndarray]] | None:
    """{site: {task: errors}} from :func:`write_samples`; None when the file is missing (a run
    of an earlier fedfm, or an arm not computed); ValueError naming the file when it is not one."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        flat = load_file(str(p))
    except Exception as e:  # safetensors raises its own SafetensorError on a corrupt header
        raise ValueError(f"{p}: per-sample errors cannot be read ({e}); delete it and re-run what wrote it") from None
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in flat.items():
        site, _, task = key.rpartition("/")
        if not site or v.ndim != 1:
            raise ValueError(f"{p}: `{key}` is not a site/task vector of per-sample errors")
        out.setdefault(site, {})[task] = v
    return out


PERSONAL_MODELS = ("before", "after")


def _check_personal_models(models: dict, kept: Any) -> str | None:
    """Why ``models`` / ``kept`` are not a site's two personalised models and its choice, else None."""
    if set(models) != set(PERSONAL_MODELS) or not all(models.values()):
        return f"expected the models {', '.join(PERSONAL_MODELS)}, each with tensors"
    if set(models["before"]) != set(models["after"]):
        return "its two models hold other keys"
    bad = next((f"{m}/{k}" for m, st in models.items() for k, v in st.items()
                if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()), None)
    if bad:
        return f"`{bad}` holds NaN or inf values"
    if not isinstance(kept, dict) or not kept or not all(isinstance(v, str) and v in PERSONAL_MODELS
                                                         for v in kept.values()):
        return f"`kept` is not a non-empty {{task: {' | '.join(PERSONAL_MODELS)}}}"
    return None


def write_personal_models(path: str | Path, models: dict[str, dict[str, np.ndarray]], kept: dict[str, str],
                          meta: dict) -> None:
    """Atomic write of a site's personalised adapter states (scripts/finetune_site.py): tensors
    ``before/<key>`` (the run's state it started from, with its own heads or local model) and
    ``after/<key>`` (fine-tuned), float32, and in the header's metadata ``kept`` (JSON {task:
    "before" | "after"}: the model the site deploys for each task) and ``meta`` (JSON: run, site,
    round, the labelled samples its side inputs are fitted on). What
    :func:`read_personal_models` would refuse is refused here, before anything is written."""
    why = _check_personal_models(models, kept)
    if why:
        raise ValueError(f"write_personal_models: {why}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        save_file({f"{m}/{k}": np.ascontiguousarray(v, dtype=np.float32) for m, st in models.items()
                   for k, v in st.items()},
                  str(tmp), metadata={"kept": json.dumps(kept), "meta": json.dumps(_jsonable(meta))})
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def read_personal_models(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str], dict]:
    """``(models, kept, meta)`` from :func:`write_personal_models`; ValueError naming the file when
    it is missing, unreadable or not such a file, and when the table finetune_site.py writes after
    it (the same name, ``.json``) is missing or is of another result: that run did not finish, or
    the file is not the one the table describes (a model the site would deploy is never guessed)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file; scripts/finetune_site.py writes it")
    try:
        with safe_open(str(p), framework="np") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
        kept, meta = json.loads(header["kept"]), json.loads(header["meta"])
    except Exception as e:  # SafetensorError on a corrupt header, KeyError/JSONDecodeError on its metadata
        raise ValueError(f"{p}: not a personalised-models file of scripts/finetune_site.py ({type(e).__name__}: "
                         f"{e}); re-run it") from None
    models: dict[str, dict[str, np.ndarray]] = {m: {} for m in PERSONAL_MODELS}
    for key, v in flat.items():
        m, _, k = key.partition("/")
        if m not in models or not k:
            raise ValueError(f"{p}: tensor `{key}` is not before/<key> or after/<key>")
        models[m][k] = v
    why = _check_personal_models(models, kept)
    if why:
        raise ValueError(f"{p}: {why}; the file is damaged (re-run scripts/finetune_site.py)")
    table = read_json(p.with_suffix(".json"), _MISSING)
    if table is _MISSING:
        raise ValueError(f"{p}: its table {p.with_suffix('.json').name} is missing, so the run that wrote it did not "
                         f"finish; re-run scripts/finetune_site.py")
    rows = table.get("rows") if isinstance(table, dict) else None
    if (not isinstance(rows, list) or table.get("models_file") != p.name
            or {r.get("task"): r.get("kept") for r in rows if isinstance(r, dict)} != kept):
        raise ValueError(f"{p}: {p.with_suffix('.json').name} beside it is the table of another result; "
                         f"re-run scripts/finetune_site.py")
    return models, kept, meta


def _ends_cleanly(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def check_fresh_run_dir(run_dir: str | Path) -> None:
    """ValueError when ``run_dir`` already holds a run. A new run there would append to its
    logs, reuse its cached baselines and leave its later checkpoints for a resume to pick up:
    the report would mix the two runs. Nothing is written or removed."""
    d = Path(run_dir)
    held = [n for n in ("config.json", "metrics.jsonl", "ledger.jsonl") if (d / n).exists()]
    if (d / CHECKPOINTS).is_dir() and any((d / CHECKPOINTS).iterdir()):
        held.append(f"{CHECKPOINTS}/")
    if held:
        raise ValueError(f"{d}: already holds a run ({held[0]}); choose another out-dir, continue that run "
                         f"with resume={d}, or delete the folder")


def check_fresh_output(out_dir: str | Path, names: tuple[str, ...], flag: str = "--out") -> None:
    """ValueError, before anything is written, when ``out_dir`` is not a folder that can take
    new results: a file, or a folder already holding one of ``names`` (an earlier run's
    results, which the new run would overwrite, or mix with its own should it fail)."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{flag} {d}: is a file, not a folder")
    held = [n for n in names if (d / n).exists()]
    if held:
        raise ValueError(f"{flag} {d}: already holds results ({held[0]}); choose another {flag} or delete them")


class RunLog:
    """Appends to and checkpoints into one run folder (created if missing)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CHECKPOINTS).mkdir(exist_ok=True)

    # ---- append-only logs -------------------------------------------------------------
    def _append(self, name: str, rows: Iterable[dict]) -> None:
        lines = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
        if lines:
            with open(self.dir / name, "a") as f:
                f.write(lines)
                f.flush()

    def append_metrics(self, rows: Iterable[dict]) -> None:
        self._append("metrics.jsonl", rows)

    def append_ledger(self, rows: Iterable[dict]) -> None:
        self._append("ledger.jsonl", rows)

    def append_event(self, round_: int, site: str, level: str, message: str) -> None:
        self._append("events.jsonl", [{"round": round_, "site": site, "level": level, "message": message}])

    def write_config(self, config: dict) -> None:
        write_json(self.dir / "config.json", config)

    def read_config(self) -> dict:
        return read_run_config(self.dir)

    # ---- checkpoints ------------------------------------------------------------------
    def checkpoint_dir(self, round_: int) -> Path:
        return self.dir / CHECKPOINTS / f"round-{round_:03d}"

    def save_checkpoint(self, round_: int, adapter: dict[str, np.ndarray],
                        strategy_state: dict[str, np.ndarray], state: dict) -> Path:
        """Write round ``round_``'s global adapter state (float32), the strategy's arrays
        (e.g. FedAdam moments) and a JSON ``state`` (RNG state, round, hashes)."""
        final = self.checkpoint_dir(round_)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.items()},
                  str(tmp / "adapter.safetensors"))
        save_file({k: np.ascontiguousarray(v) for k, v in strategy_state.items()},
                  str(tmp / "strategy.safetensors"))
        write_json(tmp / "state.json", {"round": round_, **state})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def drop_checkpoints_before(self, round_: int) -> None:
        """Delete the checkpoints of rounds before ``round_`` (a run that keeps only its last
        one: stage=pretrain's full state is the whole backbone, megabytes a round)."""
        for r in self.complete_rounds():
            if r < round_:
                shutil.rmtree(self.checkpoint_dir(r), ignore_errors=True)

    def complete_rounds(self) -> list[int]:
        rounds = []
        for d in (self.dir / CHECKPOINTS).glob("round-[0-9][0-9][0-9]"):
            if (d / "state.json").exists() and (d / "adapter.safetensors").exists():
                rounds.append(int(d.name.split("-")[1]))
        return sorted(rounds)

    def last_complete_round(self) -> int | None:
        rounds = self.complete_rounds()
        return rounds[-1] if rounds else None

    def load_checkpoint(self, round_: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
        d = self.checkpoint_dir(round_)
        if not (d / "state.json").exists():
            raise ValueError(f"{d}: no complete checkpoint for round {round_}")
        loaded = []
        for name in ("adapter.safetensors", "strategy.safetensors"):
            try:
                arrays = load_file(str(d / name))
            except Exception as e:  # safetensors raises its own SafetensorError on a corrupt header
                raise ValueError(f"{d / name}: checkpoint file cannot be read ({e}); resume from an earlier "
                                 f"round's copy of the run, or start a new run") from None
            bad = next((k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()), None)
            if bad is not None:  # the server never writes one (it rejects NaN updates): a damaged file
                raise ValueError(f"{d / name}: `{bad}` holds NaN or inf values; the checkpoint is damaged "
                                 f"(resume from an earlier round's copy of the run, or start a new run)")
            loaded.append(arrays)
        state = read_json(d / "state.json")
        if not isinstance(state, dict):
            raise ValueError(f"{d / 'state.json'}: not a JSON object")
        return loaded[0], loaded[1], state

    def truncate_after(self, round_: int) -> None:
        """Forget everything logged after round ``round_`` (an interrupted round)."""
        for name in JSONL_FILES:
            rows = read_jsonl(self.dir / name, drop_torn_tail=True)
            keep = [r for r in rows if r.get("round") is None or r["round"] <= round_]
            if len(keep) != len(rows) or not _ends_cleanly(self.dir / name):
                tmp = self.dir / (name + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
                os.replace(tmp, self.dir / name)
        for d in (self.dir / CHECKPOINTS).iterdir():
            stem = d.name.removesuffix(".tmp")
            if d.name.endswith(".tmp") or (stem.startswith("round-") and int(stem[6:]) > round_):
                shutil.rmtree(d, ignore_errors=True)
