"""Site scenarios and federations: YAML → validated, frozen dataclasses.

A site is one simulated base station. Its YAML names the TR 38.901 environment, the
sub-6 GHz uplink it observes, the co-located mmWave array whose best beam it predicts,
the time grid, the UE population and the channel-estimation conditions. Every bad value
raises :class:`ConfigError` (a ``ValueError``) whose one-line message names the file,
the key, the value and what is allowed.

    python -m fedfm.scenarios validate scenarios/sites/*.yaml scenarios/federations/*.yaml
    python -m fedfm.scenarios generate scenarios/sites/uma_1g9.yaml --split test --out uma.npz
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

ENVIRONMENTS = ("uma", "umi", "rma", "inh")
LOS_MODES = ("auto", "los", "nlos")
SPLITS = ("train", "val", "test")


class ConfigError(ValueError):
    """A scenario or federation file holds a value fedfm cannot use."""


@dataclass(frozen=True)
class Sub6Spec:
    carrier_ghz: float = 1.9            # uplink carrier [GHz]; LLM4WM Table II
    antennas: int = 8                   # BS uniform linear array, half-wavelength spacing
    subcarriers: int = 64               # CSI sub-bands per slot
    subcarrier_spacing_khz: float = 240.0  # spacing of the sampled sub-bands (≈15 MHz span)


@dataclass(frozen=True)
class MmWaveSpec:
    carrier_ghz: float = 28.0
    antennas: int = 64                  # co-located BS ULA
    subcarriers: int = 64
    subcarrier_spacing_khz: float = 1920.0  # ≈123 MHz span
    codebook_beams: int = 256           # super-resolution DFT codebook (LLM4WM: 256)
    oversampling: int = 4               # beams = oversampling × antennas


@dataclass(frozen=True)
class TimeSpec:
    history_slots: int = 16             # T: slots the BS has observed
    horizon_slots: int = 4              # P: slots to predict (CP)
    slot_interval_ms: float = 0.5


@dataclass(frozen=True)
class UESpec:
    speed_min_mps: float = 0.0
    speed_max_mps: float = 15.0
    distance_min_m: float = 35.0        # 2D UE–BS distance
    distance_max_m: float = 300.0


@dataclass(frozen=True)
class EstimationSpec:
    pilot_spacing: int = 4              # CE pilots on every 4th sub-band
    snr_db_min: float = 10.0            # per-sample SNR of the BS's estimates, uniform in [min, max]
    snr_db_max: float = 10.0


@dataclass(frozen=True)
class SamplesSpec:
    train: int = 512
    val: int = 128
    test: int = 256


@dataclass(frozen=True)
class SiteSpec:
    name: str
    environment: str
    los_mode: str = "auto"
    sub6: Sub6Spec = field(default_factory=Sub6Spec)
    mmwave: MmWaveSpec = field(default_factory=MmWaveSpec)
    time: TimeSpec = field(default_factory=TimeSpec)
    ue: UESpec = field(default_factory=UESpec)
    estimation: EstimationSpec = field(default_factory=EstimationSpec)
    samples: SamplesSpec = field(default_factory=SamplesSpec)
    seed: int = 0
    path: str = field(default="", compare=False)  # where it was read from (not hashed)

    @property
    def num_slots(self) -> int:
        """T + P: slots generated per sample."""
        return self.time.history_slots + self.time.horizon_slots


@dataclass(frozen=True)
class Federation:
    name: str
    train_sites: tuple[SiteSpec, ...]
    heldout_sites: tuple[SiteSpec, ...]
    path: str = ""

    @property
    def sites(self) -> tuple[SiteSpec, ...]:
        return self.train_sites + self.heldout_sites

    @property
    def num_beams(self) -> int:
        return self.train_sites[0].mmwave.codebook_beams


# ---- validation ---------------------------------------------------------------------
# (key, type, check, allowed-text); check(value, section_dict) -> bool
_POS_INT = (int, lambda v: v > 0, "a positive integer")
_POS_FLOAT = (float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_NONNEG_FLOAT = (float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
_SNR = (float, lambda v: -30 <= v <= 60, "a number in [-30, 60] dB")
_SPEED = (float, lambda v: 0 <= v <= 140, "a number in [0, 140] m/s (500 km/h, TR 38.913's fastest scenario)")
# a split is generated and held in memory whole (a benchmark split of 10 000 is ~1.4 GB on disk)
_SAMPLES = (int, lambda v: 0 < v <= 1_000_000, "a positive integer <= 1000000")

_SECTIONS: dict[str, tuple[type, dict[str, tuple]]] = {
    "sub6": (Sub6Spec, {
        "carrier_ghz": (float, lambda v: 0.5 <= v <= 7.125, "a number in [0.5, 7.125] GHz (FR1)"),
        "antennas": _POS_INT, "subcarriers": _POS_INT, "subcarrier_spacing_khz": _POS_FLOAT}),
    "mmwave": (MmWaveSpec, {
        "carrier_ghz": (float, lambda v: 6.0 <= v <= 100.0, "a number in [6, 100] GHz (TR 38.901 range)"),
        "antennas": _POS_INT, "subcarriers": _POS_INT, "subcarrier_spacing_khz": _POS_FLOAT,
        "codebook_beams": _POS_INT, "oversampling": _POS_INT}),
    "time": (TimeSpec, {
        "history_slots": _POS_INT, "horizon_slots": _POS_INT, "slot_interval_ms": _POS_FLOAT}),
    "ue": (UESpec, {
        "speed_min_mps": _SPEED, "speed_max_mps": _SPEED,
        "distance_min_m": (float, lambda v: v >= 1.0, "a number >= 1 m"),
        "distance_max_m": (float, lambda v: 1.0 <= v <= 10_000.0,
                           "a number in [1, 10000] m (TR 38.901 path loss is defined to 10 km)")}),
    "estimation": (EstimationSpec, {
        "pilot_spacing": _POS_INT, "snr_db_min": _SNR, "snr_db_max": _SNR}),
    "samples": (SamplesSpec, {"train": _SAMPLES, "val": _SAMPLES, "test": _SAMPLES}),
}
_TOP = {
    "name": (str, lambda v: bool(v) and all(c.isalnum() or c in "-_." for c in v),
             "a non-empty name of letters, digits, '-', '_' or '.'"),
    "environment": (str, lambda v: v in ENVIRONMENTS, f"one of {', '.join(ENVIRONMENTS)}"),
    "los_mode": (str, lambda v: v in LOS_MODES, f"one of {', '.join(LOS_MODES)}"),
    "seed": (int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)"),
}


def _fail(path: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: `{key}` = {value!r} is not allowed; expected {allowed}")


def _coerce(path: str, key: str, value: Any, typ: type, check, allowed: str) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or isinstance(value, bool):
        hint = ""
        if typ in (int, float) and isinstance(value, str):
            number = re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE]([+-]?)\d+)?\s*", value)
            if number and number.group(2) and not number.group(3):
                hint = "; YAML 1.1 reads an exponent without a sign as text: write 1.0e+3, not 1.0e3"
            elif number:  # a plain number YAML read as text: it was quoted
                hint = f"; it is quoted: write {value.strip()}, not {value!r}"
        raise _fail(path, key, value, f"{allowed} ({typ.__name__}){hint}")
    if not check(value):
        raise _fail(path, key, value, allowed)
    return value


def _check_keys(path: str, prefix: str, data: dict, known: dict, required: tuple = ()) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key `{prefix}{key}`; allowed keys: {', '.join(known)}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{path}: missing required key `{prefix}{key}`")


def site_from_dict(data: Any, path: str = "<dict>") -> SiteSpec:
    """Validate a parsed site YAML and build its :class:`SiteSpec`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a site file must be a mapping of keys, got {type(data).__name__}")
    _check_keys(path, "", data, {**_TOP, **_SECTIONS}, required=("name", "environment"))
    kwargs: dict[str, Any] = {"path": path}
    for key, (typ, check, allowed) in _TOP.items():
        if key in data:
            kwargs[key] = _coerce(path, key, data[key], typ, check, allowed)
    for section, (cls, fields) in _SECTIONS.items():
        sub = data.get(section, {})
        if not isinstance(sub, dict):
            raise _fail(path, section, sub, "a mapping of keys")
        _check_keys(path, f"{section}.", sub, fields)
        kwargs[section] = cls(**{k: _coerce(path, f"{section}.{k}", v, *fields[k]) for k, v in sub.items()})
    spec = SiteSpec(**kwargs)
    _check_relations(spec, path)
    return spec


def _check_relations(s: SiteSpec, path: str) -> None:
    if s.ue.speed_min_mps > s.ue.speed_max_mps:
        raise _fail(path, "ue.speed_min_mps", s.ue.speed_min_mps, f"<= ue.speed_max_mps ({s.ue.speed_max_mps})")
    if s.ue.distance_min_m > s.ue.distance_max_m:
        raise _fail(path, "ue.distance_min_m", s.ue.distance_min_m, f"<= ue.distance_max_m ({s.ue.distance_max_m})")
    if s.estimation.snr_db_min > s.estimation.snr_db_max:
        raise _fail(path, "estimation.snr_db_min", s.estimation.snr_db_min,
                    f"<= estimation.snr_db_max ({s.estimation.snr_db_max})")
    mm = s.mmwave
    if mm.codebook_beams < mm.antennas:
        raise _fail(path, "mmwave.codebook_beams", mm.codebook_beams, f">= mmwave.antennas ({mm.antennas})")
    if mm.codebook_beams != mm.oversampling * mm.antennas:
        raise _fail(path, "mmwave.codebook_beams", mm.codebook_beams,
                    f"mmwave.oversampling × mmwave.antennas = {mm.oversampling * mm.antennas}")
    k, p = s.sub6.subcarriers, s.estimation.pilot_spacing
    if p >= k:
        raise _fail(path, "estimation.pilot_spacing", p, f"< sub6.subcarriers ({k})")
    if k % 2:
        raise _fail(path, "sub6.subcarriers", k, "an even number (PF predicts the upper half from the lower)")
    if s.environment == "inh" and s.ue.distance_max_m > 150:
        raise _fail(path, "ue.distance_max_m", s.ue.distance_max_m, "<= 150 m for an indoor hotspot (inh)")
    # the outdoor path-loss models' validity (TR 38.901 Table 7.4.1-1): from 10 m, to 5 km in UMa
    # and UMi, to 10 km in RMa (the global bound)
    if s.environment != "inh" and s.ue.distance_min_m < 10:
        raise _fail(path, "ue.distance_min_m", s.ue.distance_min_m,
                    f">= 10 m for {s.environment} (TR 38.901 path loss is defined from 10 m)")
    if s.environment in ("uma", "umi") and s.ue.distance_max_m > 5000:
        raise _fail(path, "ue.distance_max_m", s.ue.distance_max_m,
                    f"<= 5000 m for {s.environment} (TR 38.901 path loss is defined to 5 km)")
    if s.mmwave.carrier_ghz <= s.sub6.carrier_ghz:
        raise _fail(path, "mmwave.carrier_ghz", s.mmwave.carrier_ghz,
                    f"a carrier above sub6.carrier_ghz ({s.sub6.carrier_ghz} GHz): BF maps the sub-6 band to mmWave")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value silently, so `name: a` … `name: b` would run site b without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` appears twice (lines {first} and {line})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (byte {e.start} is not UTF-8); expected a YAML file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None


def load_site(path: str | Path) -> SiteSpec:
    return site_from_dict(read_yaml(path), str(path))


def federation_entries(path: str | Path) -> tuple[str, list[tuple[str, str]]]:
    """A federation YAML's ``name`` and ``[(absolute site YAML path, 'train'|'heldout'), ...]``
    in file order (train first), with the file's own structure checked: a mapping of the known
    keys (``heldout_site`` for ``heldout_sites`` would silently hold nothing out), a name,
    lists of paths, each site once. Reads no site file, so a broken one does not fail here."""
    p = Path(path)
    data = read_yaml(p)  # one line naming the file: unreadable, not text, malformed, a key twice
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a federation file must be a mapping of keys")
    if "environment" in data and "train_sites" not in data:  # say so, not which key it lacks
        raise ConfigError(f"{p}: a site file (it has `environment`), not a federation; expected a federation "
                          f"file with `train_sites` (e.g. scenarios/federations/default.yaml)")
    _check_keys(str(p), "", data, {"name": 0, "train_sites": 0, "heldout_sites": 0}, required=("name", "train_sites"))
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise _fail(str(p), "name", data["name"], "a non-empty string")
    out: list[tuple[str, str]] = []
    for key, role in (("train_sites", "train"), ("heldout_sites", "heldout")):
        entries = data.get(key)
        entries = [] if entries is None else entries  # `heldout_sites:` left empty holds none out
        if not isinstance(entries, list) or (key == "train_sites" and not entries):
            raise _fail(str(p), key, entries, "a non-empty list of site YAML paths" if key == "train_sites"
                        else "a list of site YAML paths")
        for entry in entries:
            if not isinstance(entry, str):
                raise ConfigError(f"{p}: `{key}` entry {entry!r} is not allowed; expected a site YAML path")
            site = str((p.parent / entry).resolve())
            seen = next((r for s, r in out if s == site), None)
            if seen is not None:
                where = "twice" if seen == role else "in both `train_sites` and `heldout_sites`"
                raise ConfigError(f"{p}: `{key}` entry {entry!r} is not allowed: that site is listed {where}; "
                                  f"expected each site once")
            out.append((site, role))
    return data["name"], out


def load_listed_site(federation: str | Path, site: str, role: str) -> SiteSpec:
    """The site a federation lists; a missing file is named with the federation that lists it."""
    if not Path(site).is_file():
        key = "train_sites" if role == "train" else "heldout_sites"
        what = "a folder, not a file" if Path(site).is_dir() else "no such file"
        raise ConfigError(f"{site}: {what}, listed in `{key}` of {federation}; expected a site YAML "
                          f"path relative to the federation file")
    return load_site(site)


def load_federation(path: str | Path) -> Federation:
    """Load a federation YAML: ``name``, ``train_sites`` and ``heldout_sites`` (paths
    relative to the federation file); every site must load."""
    name, entries = federation_entries(path)
    groups = {role: tuple(load_listed_site(path, site, r) for site, r in entries if r == role)
              for role in ("train", "heldout")}
    check_sites_fit(path, groups["train"] + groups["heldout"])
    return Federation(name, groups["train"], groups["heldout"], str(path))


def check_sites_fit(path: str | Path, sites: Iterable[SiteSpec]) -> None:
    """ConfigError when a federation's sites do not fit together: a name twice would merge two
    sites' rows and caches, another beam count needs another BF head."""
    sites = list(sites)
    for i, a in enumerate(sites):
        b = next((b for b in sites[i + 1:] if b.name == a.name), None)
        if b is not None:
            raise ConfigError(f"{path}: sites {a.path} and {b.path} are both named {a.name!r}; "
                              f"expected unique site names")
    if len({s.mmwave.codebook_beams for s in sites}) > 1:
        counts = ", ".join(f"{s.name} {s.mmwave.codebook_beams}" for s in sites)
        raise ConfigError(f"{path}: `mmwave.codebook_beams` differs between sites ({counts}); expected one "
                          f"beam count shared by all sites (one BF head)")


def spec_to_dict(spec: SiteSpec) -> dict:
    d = dataclasses.asdict(spec)
    d.pop("path")
    return d


def spec_hash(spec: SiteSpec) -> str:
    """Content hash of everything that shapes the site's data (not its file path)."""
    blob = json.dumps(spec_to_dict(spec), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed derived from a root seed and labels, e.g. ``derive_seed(7, "test")``.

    Hash-based so that adding a split or a round never shifts another's seed."""
    blob = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


def split_seed(spec: SiteSpec, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return derive_seed(spec.seed, spec.name, split)


if __name__ == "__main__":
    from fedfm.cli_scenarios import main

    raise SystemExit(main())
