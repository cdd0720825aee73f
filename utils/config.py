"""Key checks of the composed Hydra config: a mistyped key fails before any compute, named with its nearest
valid neighbour (``++num_sampels=4`` or ``++sampler.annealing_scheduler_config.num_step=3`` used to run
silently with the defaults).

Two layers: :func:`check_composed` compares the composed config with the files it was composed from (the
default config and each selected group file; a node that is null in its file, such as
``k2_scheduler_config``, is left to its builder), and every builder checks its own keys with
:func:`check_keys`.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "model", "task", "sampler")


def signature_keys(fn: Any) -> dict[str, None]:
    """Keyword arguments ``fn`` accepts (an open ``**kwargs`` adds nothing)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: None for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def optional_keys(group: str, node: dict) -> dict:
    """Keys the code reads that a group file may leave out (added with ``+group.key=value``)."""
    if group == "data":
        from utils.data import DATASETS

        return signature_keys(DATASETS[node["name"]]) if node.get("name") in DATASETS else {}
    if group == "model":
        from cores.models import MODELS, diffusers_model

        builder = MODELS.get(node.get("name"))
        if builder is None:
            return {}
        keys = signature_keys(builder)
        if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()):
            keys.update(signature_keys(diffusers_model))
        return keys
    if group == "sampler":
        return {"diffusion_scheduler_config": {"solver": None}}
    if group == "task":  # every group of a task file, selected or not: the MCMC keys and its operator's arguments
        from cores.mcmc import MCMCConfig
        from cores.operators import OPERATORS

        out = {}
        for name, sub in node.items():
            op = (sub or {}).get("operator") or {}
            op_cls = OPERATORS.get(op.get("name")) if isinstance(op, dict) else None
            out[name] = {"mcmc_sampler_config": dict.fromkeys(MCMCConfig.known_keys()),
                         "operator": {"name": None, **signature_keys(op_cls)} if op_cls else None}
        return out
    return {}


def nearest(key: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid key, or ''."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def check_keys(cfg: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Refuse keys of ``cfg`` outside ``valid``, naming ``where`` and the nearest valid key."""
    valid = set(valid)
    for key in cfg:
        if key not in valid:
            raise ValueError(f"unknown key {where}.{key}{nearest(key, valid)}; valid keys: {', '.join(sorted(valid))}")


class SubConfig:
    """Base of a dataclass built from one sub-config (``where``, its dotted path): unknown keys are refused naming
    the nearest field, then :meth:`validate` checks the values; :meth:`describe` gives the fields back."""

    where = "config"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Any:
        cfg = dict(cfg or {})
        check_keys(cfg, [f.name for f in fields(cls)], cls.where)
        rule = cls(**cfg)
        rule.validate()
        return rule

    def validate(self) -> None:
        """Refuse values the feature cannot use (none by default)."""

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node


def _compare(given: Any, reference: Any, where: str) -> None:
    if not isinstance(given, dict) or not isinstance(reference, dict):
        return
    for key, value in given.items():
        if key not in reference:
            valid = set(reference)
            raise ValueError(f"unknown key {where}.{key}{nearest(str(key), valid)}; valid keys here: "
                             f"{', '.join(sorted(map(str, valid)))}")
        if reference[key] is not None:
            _compare(value, reference[key], f"{where}.{key}")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _group_file(group: str, choice: str, search: Sequence[Path]) -> Path | None:
    for root in search:
        path = Path(root) / group / f"{choice}.yaml"
        if path.is_file():
            return path
    return None


def check_composed(cfg: DictConfig, choices: Mapping[str, str | None], search: Sequence[Path] = (CONFIGS,)) -> None:
    """Every key of the composed config exists in the file it comes from (or is an optional key the code reads).

    ``choices`` maps each group to the option selected (Hydra's ``runtime.choices``), ``search`` the config
    folders (the repository's, and any on ``hydra.searchpath``). A group given key by key (``+data.name=...``)
    has no file: its builder checks its keys.
    """
    top = _plain(OmegaConf.load(CONFIGS / "default.yaml"))
    top.pop("defaults", None)
    top.pop("hydra", None)
    valid_top = set(top) | set(GROUPS)
    for key in cfg:
        if key not in valid_top:
            raise ValueError(f"unknown top-level key {key}{nearest(str(key), valid_top)}; valid keys: "
                             f"{', '.join(sorted(valid_top))}")
    for group in GROUPS:
        choice = choices.get(group)
        path = _group_file(group, choice, search) if choice else None
        if path is None or cfg.get(group) is None:
            continue
        given = _plain(cfg[group])
        reference = _merge(_plain(OmegaConf.load(path)), optional_keys(group, given))
        _compare(given, reference, group)


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def check_experiment_order(cfg: DictConfig, choices: Mapping[str, str | None], search: Sequence[Path]) -> None:
    """An experiment that sets keys of a group must come after that group on the command line: Hydra composes
    ``+group=...`` options in command-line order, so ``+experiment=k2_quality +sampler=edm_daps`` would let the
    sampler file put back ``k2_scheduler_config: null`` and run the preset schedule without a word."""
    choice = choices.get("experiment")
    node = _experiment(choice, search) if choice else None
    if node is None:
        return
    for key, value in _leaves(node):
        if key.split(".")[0] in GROUPS and value is not None and OmegaConf.select(cfg, key) is None:
            raise ValueError(f"+experiment={choice} sets {key}, but the {key.split('.')[0]} group composed after it "
                             f"reset it: put +experiment={choice} after +{key.split('.')[0]}=... on the command line")


def _experiment(choice: str, search: Sequence[Path]) -> dict | None:
    """An experiment file's keys with those of the experiments in its defaults list under them (its own keys win, as
    Hydra composes them without ``_self_``); None when no file is found."""
    path = _group_file("experiment", choice, search)
    if path is None:
        return None
    node = _plain(OmegaConf.load(path))
    node.pop("hydra", None)
    merged: dict = {}
    for entry in node.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            merged = _merge(merged, _experiment(entry, search) or {})
    return _merge(merged, node)

