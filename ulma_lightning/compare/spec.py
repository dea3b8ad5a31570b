"""The grid YAML of ``ulma compare``: reading, checking (before any training) and expanding into runs.

A grid names data *variants* (each maps data *kinds* to sources), *runs* (a chain of *stages*, each a
method config with overrides and a data kind), *seeds*, the *evaluation* settings and a ``quick``
subset. Every mistake a user can make in it is reported as :class:`GridError`, naming the file,
line and entry, before anything is trained. See ``experiments/paper.yaml`` for a full example.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ulma_lightning.choices import choice_problem
from ulma_lightning.importing import import_object
from ulma_lightning.options import UserError
from ulma_lightning.shipped import shipped_configs_dir

PACKAGE_CONFIGS = shipped_configs_dir()  # the configs shipped in the package (a checkout: its configs/)
DEFAULT_SEED_KEYS = ("seed_everything", "model.init_args.policy.init_seed")
DEFAULT_REWARD_ARG = "model.init_args.reward_model"
SOURCE_SPLITS = ("train", "val", "test")


class GridError(UserError):
    """A mistake in the grid YAML, found before any training; the message names the entry."""


def tuning_keys(stages: list[StageSpec]) -> list[str]:
    """Each stage's key in ``tune.methods`` and ``tuned:``: the methods of the chain up to it, joined by
    ``>`` (``sft``, ``sft>dpo``, ``sft>reward>ppo``), leaving out the shared base stage; so DPO after SFT
    is tuned apart from DPO from the base. The base stage's key is ``base``."""
    keys, chain = [], []
    for stage in stages:
        if stage.sources is not None:
            keys.append(BASE_RUN)
            continue
        chain.append(stage.method)
        keys.append(">".join(chain))
    return keys


class Entry(dict):
    """A YAML mapping that remembers its line (1-based) in the file."""

    line: int = 0


class _LineLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _LineLoader, node: yaml.MappingNode) -> Entry:
    entry = Entry(loader.construct_mapping(node, deep=True))
    entry.line = node.start_mark.line + 1
    return entry


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(path: Path) -> Any:
    """The YAML document at ``path``, mappings as :class:`Entry` (with their line)."""
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class StageSpec:
    """One training step of a run: ``ulma fit`` with a method config, overrides and a data kind.

    Attributes:
        method: a short name (the config file's stem, e.g. ``sft``).
        config: the method config file.
        data: the data kind (a key of every variant the run uses, e.g. ``demonstration``).
        overrides: dotted ``ulma fit`` options (``trainer.max_steps: 50``).
        role: ``policy`` (a causal LM to align) or ``reward`` (a reward model, passed to the next stage).
        reward_arg: the option through which a stage after a reward stage receives the reward model.
        module_class: the module's ``class_path``.
        sources: fixed sources (split -> source) instead of the variant's ``data`` kind: the base stage,
            the same for every variant.
    """

    method: str
    config: Path
    data: str
    overrides: dict[str, Any] = field(default_factory=dict)
    role: str = "policy"
    reward_arg: str = DEFAULT_REWARD_ARG
    module_class: str = ""
    sources: dict[str, str] | None = None


@dataclass
class RunSpec:
    """A row of the results: a chain of stages trained per variant and seed, then evaluated."""

    name: str
    label: str
    stages: list[StageSpec]
    variants: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass
class EvaluationSpec:
    """What is measured on held-out data after each run (see :mod:`ulma_lightning.compare.metrics`).

    Attributes:
        prompts: the test prompts (any data source; a record's response is its reference answer).
        golden: held-out golden demonstrations whose perplexity is measured (none: skipped).
        scorer: the ground-truth scorer, ``{class_path, init_args}``.
        request_kind: dotted path of a function ``prompt -> "harmless" | "harmful"`` splitting the
            score into helpfulness and harmlessness (none: no split).
        generation: ``GenerationConfig`` options of the greedy generations.
        kl_max_new_tokens: tokens sampled per response for the KL estimate (0: no KL).
        max_prompts: the first N test prompts (none: all).
        max_length: tokens per demonstration for the perplexity.
        batch_size: prompts or demonstrations per forward.
        baseline: the run whose row the others' ``win_vs_<baseline>`` compares against.
    """

    prompts: str
    golden: str | None = None
    scorer: dict[str, Any] = field(default_factory=lambda: {"class_path": "ulma_lightning.evaluation.DemoScorer"})
    request_kind: str | None = None
    generation: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 48})
    kl_max_new_tokens: int = 48
    max_prompts: int | None = None
    max_length: int = 512
    batch_size: int = 32
    baseline: str | None = "sft"


@dataclass
class TuneSpec:
    """The hyper-parameter rule of ``ulma compare --tune``, the same for every method: train each
    candidate of ``grid`` (the options a method's module takes) on ``variant`` with ``seed``, and
    keep the one whose greedy generations on the validation ``prompts`` score best.

    Attributes:
        prompts: the validation prompts (never the test prompts).
        grid: dotted option -> candidate values, e.g. ``model.init_args.optimizer.lr: [1e-3, 2e-3]``.
        variant: the data variant trained on.
        seed: the seed of every candidate (one tuning seed).
        max_prompts: the first N validation prompts (none: all).
        seeds: several tuning seeds; a candidate's score is its mean over them (replaces ``seed``).
        methods: per method (a chain's tuning key, e.g. ``dpo`` or ``sft>dpo``, or a method name),
            candidate values replacing the shared ``grid``'s: a beta grid that spans the loss's scale.
        extend_edges: how many times a numeric pick on a grid's edge extends that grid by one more
            value (the next term of the grid's geometric or arithmetic step) and tunes again.
    """

    prompts: str
    grid: dict[str, list[Any]]
    variant: str = "ordinary"
    seed: int = 0
    max_prompts: int | None = None
    seeds: list[int] | None = None
    methods: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    extend_edges: int = 0

    @property
    def tuning_seeds(self) -> list[int]:
        """The seeds whose mean validation score ranks the candidates (``seeds``, else ``[seed]``)."""
        return list(self.seeds) if self.seeds else [self.seed]

    def values(self, method: str) -> dict[str, list[Any]]:
        """The candidate values of ``method``: the shared ``grid`` with its ``methods:`` entry over it."""
        return {**self.grid, **self.methods.get(method, {})}


@dataclass
class GridSpec:
    """A whole grid, checked: variants, runs, seeds, evaluation; ``quick`` already applied if asked."""

    path: Path
    name: str
    seeds: list[int]
    seed_keys: list[str]
    variants: dict[str, dict[str, dict[str, str]]]
    runs: list[RunSpec]
    evaluation: EvaluationSpec
    overrides: dict[str, Any] = field(default_factory=dict)
    launcher: str = "inprocess"
    jobs: int = 1
    keep_checkpoints: bool = False
    output: str | None = None
    tune: TuneSpec | None = None
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    base: StageSpec | None = None
    data_seed: int = 0

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)


# ----------------------------------------------------------------------------- checking helpers
def check_path_name(name: str, where: str, what: str) -> None:
    """Refuse a name that becomes a folder of the output (a run, a variant, a method) but could
    leave it: ``/`` or ``\\`` in it, or a leading ``.`` (``..``, hidden files)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise GridError(
            f"{where}: {what} cannot be empty, contain '/' or '\\', or start with '.' (it names a folder of the "
            f"output), got {name!r}"
        )


def _where(path: Path, node: Any, what: str) -> str:
    line = getattr(node, "line", 0)
    return f"{path}:{line}: {what}" if line else f"{path}: {what}"


def _mapping_of(value: Any, path: Path, what: str, parent: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(_where(path, parent, f"{what} must be a mapping, got {type(value).__name__} {value!r}"))
    return dict(value)


def _check_keys(entry: dict[str, Any], allowed: set[str], path: Path, what: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise GridError(_where(path, entry, f"{what}: unknown key(s) {unknown}; allowed: {sorted(allowed)}"))


def _resolve_file(name: str, grid_dir: Path) -> Path | None:
    for base in (Path.cwd(), grid_dir, grid_dir.parent):
        candidate = (base / name).resolve()
        if candidate.is_file():
            return candidate
    return None


def _known_methods(configs_dir: Path) -> list[str]:
    return sorted(p.stem for p in configs_dir.glob("*.yaml")) if configs_dir.is_dir() else []


def _module_class(config: Path, overrides: dict[str, Any], where: str) -> tuple[str, type]:
    """The module class a stage trains: the config's ``model.class_path`` unless overridden."""
    try:
        content = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GridError(f"{where}: config {config} is not valid YAML ({exc})") from None
    model = content.get("model") if isinstance(content, dict) else None
    class_path = overrides.get("model.class_path") or (model.get("class_path") if isinstance(model, dict) else None)
    if not class_path:
        raise GridError(
            f"{where}: config {config} names no model.class_path; use a method config such as configs/ulma.yaml"
        )
    if "." not in class_path:
        class_path = f"ulma_lightning.{class_path}"
    try:
        cls = import_object(class_path)
    except ImportError as exc:
        raise GridError(
            f"{where}: unknown method class {class_path!r} in {config} ({exc}); fix model.class_path"
        ) from None
    from ulma_lightning.modules import METHOD_BASES

    if not (inspect.isclass(cls) and issubclass(cls, METHOD_BASES)):
        raise GridError(
            f"{where}: {class_path} in {config} is not an ulma-lightning method module (a subclass of AlignmentModule "
            "or RolloutModule)"
        )
    return class_path, cls


def _accepts(cls: type, arg: str) -> bool:
    """Whether ``cls`` takes the init argument that the dotted option ``arg`` names (the part after
    ``init_args``: ``optimizer`` for ``model.init_args.optimizer.lr``)."""
    parts = arg.split(".")
    name = parts[parts.index("init_args") + 1] if "init_args" in parts[:-1] else parts[-1]
    return any(
        name in inspect.signature(vars(klass)["__init__"]).parameters
        for klass in cls.__mro__
        if "__init__" in vars(klass)
    )


def _stage(raw: Any, path: Path, what: str, configs_dir: Path) -> StageSpec:
    if isinstance(raw, str):
        raise GridError(_where(path, raw, f"{what}: a stage is a mapping {{method: NAME, data: KIND}}, got {raw!r}"))
    entry = _mapping_of(raw, path, what, raw)
    entry_line = raw
    _check_keys(entry, {"method", "config", "data", "overrides", "reward_arg"}, path, what)
    method, config_name = entry.get("method"), entry.get("config")
    if not method and not config_name:
        raise GridError(
            _where(path, entry_line, f"{what}: needs `method: NAME` (a config in {configs_dir}) or `config: FILE`")
        )
    if method:
        check_path_name(
            str(method), _where(path, entry_line, what), "a method name (use `config: FILE` for a config elsewhere)"
        )
    grid_dir = path.parent
    if config_name:
        config = _resolve_file(str(config_name), grid_dir)
        if config is None:
            raise GridError(
                _where(
                    path,
                    entry_line,
                    f"{what}: config file {config_name!r} does not exist (looked in {Path.cwd()} and {grid_dir}); fix "
                    "the path",
                )
            )
    else:
        config = (configs_dir / f"{method}.yaml").resolve()
        if not config.is_file():
            known = ", ".join(_known_methods(configs_dir)) or "(none)"
            raise GridError(
                _where(
                    path,
                    entry_line,
                    f"{what}: unknown method {method!r}; known methods (configs in {configs_dir}): {known}; or give "
                    "`config: FILE`",
                )
            )
    if not entry.get("data"):
        raise GridError(
            _where(
                path,
                entry_line,
                f"{what}: needs `data: KIND` (a key of the variants, e.g. demonstration, binary, pairwise)",
            )
        )
    overrides = _mapping_of(entry.get("overrides"), path, f"{what}.overrides", entry_line)
    class_path, cls = _module_class(config, overrides, _where(path, entry_line, what))
    from ulma_lightning.modules.reward import RewardModelModule

    return StageSpec(
        method=str(method or config.stem),
        config=config,
        data=str(entry["data"]),
        overrides=overrides,
        role="reward" if issubclass(cls, RewardModelModule) else "policy",
        reward_arg=str(entry.get("reward_arg") or DEFAULT_REWARD_ARG),
        module_class=class_path,
    )


def check_chain(stages: list[StageSpec], where: str) -> None:
    """Refuse chains that cannot run: no stage, a reward model last (nothing to evaluate), a reward
    model handed to a stage whose module takes none, or two reward stages in a row."""
    if not stages:
        raise GridError(f"{where}: `stages` is empty; give at least one {{method, data}}")
    if stages[-1].role == "reward":
        raise GridError(
            f"{where}: the last stage ({stages[-1].method}) trains a reward model, which generates nothing to "
            "evaluate; follow it with a policy stage that takes the reward model (e.g. PPO), or drop it"
        )
    for before, after in zip(stages, stages[1:]):
        if before.role == "reward":
            if after.role == "reward":
                raise GridError(
                    f"{where}: two reward-model stages in a row ({before.method}, {after.method}); a reward model "
                    "feeds a policy stage"
                )
            if not _accepts(import_object(after.module_class), after.reward_arg):
                raise GridError(
                    f"{where}: stage {after.method!r} ({after.module_class}) follows the reward model of stage "
                    f"{before.method!r} but takes no `{after.reward_arg.split('init_args.')[-1]}` argument; only an RL "
                    "stage (e.g. PPO) can use a reward model (or set `reward_arg:` on that stage)"
                )


# ----------------------------------------------------------------------------- the grid
TOP_KEYS = {
    "name", "seeds", "seed_keys", "variants", "runs", "evaluation", "overrides", "quick", "heldout", "launcher", "jobs",
    "keep_checkpoints", "output", "configs_dir", "tune", "tuned", "base", "data_seed",
}  # fmt: skip
RUN_KEYS = {"name", "label", "stages", "variants", "overrides"}
QUICK_KEYS = {"seeds", "runs", "variants", "overrides", "evaluation", "tune"}
HELDOUT_KEYS = {"seeds", "data_seed"}
BASE_RUN = "base"
DATA_SEED = "{data_seed}"


def _seeds(value: Any, path: Path, what: str, parent: Any) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise GridError(_where(path, parent, f"{what} must be a non-empty list of integers, got {value!r}"))
    if len(set(value)) != len(value):
        raise GridError(_where(path, parent, f"{what} lists a seed twice: {value}"))
    return list(value)


def _variants(raw: Any, path: Path, doc: Any) -> dict[str, dict[str, dict[str, str]]]:
    variants = _mapping_of(raw, path, "variants", doc)
    if not variants:
        raise GridError(
            _where(
                path,
                doc,
                "`variants` is missing: map each data variant (e.g. ordinary, golden) to its sources per data kind",
            )
        )
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, kinds in variants.items():
        check_path_name(str(name), _where(path, raw, f"variants.{name}"), "a variant name")
        kinds = _mapping_of(kinds, path, f"variants.{name}", variants.get(name) or doc)
        out[str(name)] = {}
        for kind, sources in kinds.items():
            if isinstance(sources, str):
                sources = {"train": sources}
            sources = _mapping_of(sources, path, f"variants.{name}.{kind}", kinds)
            bad = sorted(set(sources) - set(SOURCE_SPLITS))
            if bad or "train" not in sources:
                raise GridError(
                    _where(
                        path,
                        kinds,
                        f"variants.{name}.{kind}: give `train` and optionally `val`, `test` sources (got keys "
                        f"{sorted(sources)})",
                    )
                )
            out[str(name)][str(kind)] = {k: str(v) for k, v in sources.items()}
    return out


def _evaluation(raw: Any, path: Path, doc: Any) -> EvaluationSpec:
    entry = _mapping_of(raw, path, "evaluation", doc)
    allowed = set(EvaluationSpec.__dataclass_fields__)
    _check_keys(entry, allowed, path, "evaluation")
    if not entry.get("prompts"):
        raise GridError(
            _where(
                path, raw if raw else doc, "evaluation.prompts is missing: the held-out test prompts (a data source)"
            )
        )
    check_types(entry, EvaluationSpec, path, raw if raw else doc, "evaluation")
    for key, rule in EVALUATION_RULES.items():
        value = entry.get(key)
        if value is not None and not (value >= 1 if rule == ">= 1" else value >= 0):
            raise GridError(_where(path, raw, f"evaluation.{key} must be {rule}, got {value!r}"))
    if not isinstance(entry.get("scorer", {"class_path": ""}).get("class_path"), str):
        raise GridError(
            _where(
                path,
                raw,
                "evaluation.scorer needs a `class_path` (e.g. ulma_lightning.evaluation.DemoScorer) and optionally "
                "`init_args`",
            )
        )
    try:
        return EvaluationSpec(**entry)
    except TypeError as exc:
        raise GridError(_where(path, raw, f"evaluation: {exc}")) from None


#: numeric rules of the ``evaluation:`` options (checked before any training)
EVALUATION_RULES = {"max_prompts": ">= 1", "max_length": ">= 1", "batch_size": ">= 1", "kl_max_new_tokens": ">= 0"}


def _is(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` (a class, ``X | None``, ``dict[...]``, ``list[...]``);
    a bool is no number, an int is a float."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    origin = typing.get_origin(hint) or hint
    if origin in (int, float) and isinstance(value, bool):
        return False
    if origin is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin)


def _type_name(hint: Any) -> str:
    import typing

    args = typing.get_args(hint)
    if args and typing.get_origin(hint) not in (dict, list):
        return " or ".join(_type_name(a) for a in args)
    origin = typing.get_origin(hint) or hint
    return {
        type(None): "null",
        str: "a string",
        int: "a whole number",
        float: "a number",
        dict: "a mapping",
        list: "a list",
        bool: "true or false",
    }.get(origin, str(hint))


def check_types(entry: dict[str, Any], spec: type, path: Path, node: Any, what: str) -> None:
    """Refuse a value of ``entry`` whose type is not the one the dataclass ``spec`` declares for it
    (``max_prompts: "ten"``), naming file:line and the option, before anything is trained."""
    import typing

    hints = typing.get_type_hints(spec)
    for key, value in entry.items():
        if key in hints and not _is(value, hints[key]):
            raise GridError(
                _where(
                    path, node, f"{what}.{key} must be {_type_name(hints[key])}, got {type(value).__name__} {value!r}"
                )
            )


def _tune(raw: Any, path: Path, doc: Any, variants: dict[str, Any]) -> TuneSpec | None:
    if raw is None:
        return None
    entry = _mapping_of(raw, path, "tune", doc)
    _check_keys(entry, set(TuneSpec.__dataclass_fields__), path, "tune")
    grid = _mapping_of(entry.get("grid"), path, "tune.grid", raw)
    if not entry.get("prompts") or not grid:
        raise GridError(
            _where(path, raw, "tune needs `prompts` (validation prompts) and `grid` (dotted option -> list of values)")
        )
    methods = {
        str(k): _mapping_of(v, path, f"tune.methods.{k}", raw)
        for k, v in _mapping_of(entry.get("methods"), path, "tune.methods", raw).items()
    }
    for what, values_of in [("tune.grid", grid)] + [(f"tune.methods.{k}", v) for k, v in methods.items()]:
        for key, values in values_of.items():
            if not isinstance(values, list) or not values:
                raise GridError(_where(path, raw, f"{what}.{key}: give a non-empty list of values, got {values!r}"))
    if entry.get("variant", "ordinary") not in variants:
        raise GridError(
            _where(
                path,
                raw,
                f"tune.variant {entry.get('variant', 'ordinary')!r} is not a variant; the grid defines "
                f"{sorted(variants)}",
            )
        )
    if "seeds" in entry:
        entry["seeds"] = _seeds(entry["seeds"], path, "tune.seeds", raw)
    extend = entry.get("extend_edges", 0)
    if isinstance(extend, bool) or not isinstance(extend, int) or extend < 0:
        raise GridError(_where(path, raw, f"tune.extend_edges must be a whole number >= 0, got {extend!r}"))
    if entry.get("max_prompts") is not None and (
        isinstance(entry["max_prompts"], bool) or not isinstance(entry["max_prompts"], int) or entry["max_prompts"] < 1
    ):
        raise GridError(
            _where(path, raw, f"tune.max_prompts must be a whole number >= 1, got {entry['max_prompts']!r}")
        )
    return TuneSpec(**{**entry, "grid": grid, "methods": methods})


def _base(raw: Any, path: Path, doc: Any, configs_dir: Path) -> StageSpec | None:
    """The ``base:`` stage: ``{method, train, val, overrides}``, trained once per seed and shared by every run."""
    if raw is None:
        return None
    entry = _mapping_of(raw, path, "base", doc)
    _check_keys(entry, {"method", "config", "train", "val", "overrides"}, path, "base")
    if not entry.get("train"):
        raise GridError(
            _where(path, raw, "base needs `train:` (the base model's corpus, a data source) and `method:` (e.g. sft)")
        )
    sources = {split: str(entry[split]) for split in ("train", "val") if entry.get(split)}
    stage_raw = Entry({k: v for k, v in entry.items() if k in ("method", "config", "overrides")}, data="base")
    stage_raw.line = getattr(raw, "line", 0)
    stage = _stage(stage_raw, path, "base", configs_dir)
    if stage.role != "policy":
        raise GridError(
            _where(
                path,
                raw,
                f"base: {stage.method} trains a reward model; the base stage trains the policy every run starts from "
                "(e.g. method: sft)",
            )
        )
    stage.sources = sources
    return stage


def _with_data_seed(text: str | None, data_seed: int) -> str | None:
    """A source with ``{data_seed}`` replaced by the grid's data draw."""
    return None if text is None else text.replace(DATA_SEED, str(data_seed))


def _merge_heldout(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """The grid with its ``heldout:`` section applied: other seeds and another data draw (``data_seed``)."""
    heldout = _mapping_of(doc.get("heldout"), path, "heldout", doc)
    if not heldout:
        raise GridError(
            _where(
                path,
                doc,
                "--heldout: the grid has no `heldout:` section (seeds, data_seed: the held-out set of the claims)",
            )
        )
    _check_keys(heldout, HELDOUT_KEYS, path, "heldout")
    merged = dict(doc)
    if "seeds" in heldout:
        merged["seeds"] = heldout["seeds"]
    if "data_seed" in heldout:
        merged["data_seed"] = heldout["data_seed"]
    return merged


def _merge_quick(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """The grid with its ``quick:`` section applied (seeds, runs, variants replaced; overrides and
    evaluation options merged)."""
    quick = _mapping_of(doc.get("quick"), path, "quick", doc)
    if not quick:
        raise GridError(
            _where(path, doc, "--quick: the grid has no `quick:` section (seeds, runs, overrides for a short run)")
        )
    _check_keys(quick, QUICK_KEYS, path, "quick")
    merged = dict(doc)
    if "seeds" in quick:
        merged["seeds"] = quick["seeds"]
    merged["overrides"] = {
        **_mapping_of(doc.get("overrides"), path, "overrides", doc),
        **_mapping_of(quick.get("overrides"), path, "quick.overrides", quick),
    }
    if "evaluation" in quick:
        merged["evaluation"] = Entry(
            {**(doc.get("evaluation") or {}), **_mapping_of(quick["evaluation"], path, "quick.evaluation", quick)}
        )
        merged["evaluation"].line = getattr(doc.get("evaluation"), "line", 0)
    runs = doc.get("runs") or []
    if "runs" in quick:
        names = [r.get("name") for r in runs if isinstance(r, dict)]
        missing = [n for n in quick["runs"] if n not in names and not (n == BASE_RUN and doc.get("base") is not None)]
        if missing:
            raise GridError(
                _where(path, quick, f"quick.runs names runs that do not exist: {missing}; runs are {names}")
            )
        runs = [r for r in runs if isinstance(r, dict) and r.get("name") in quick["runs"]]
    if "variants" in quick:
        runs = [
            Entry(r, variants=[v for v in (r.get("variants") or quick["variants"]) if v in quick["variants"]])
            for r in runs
        ]
        for new, old in zip(runs, doc.get("runs") or []):
            new.line = getattr(old, "line", 0)
    merged["runs"] = runs
    if "tune" in quick:
        merged["tune"] = Entry({**(doc.get("tune") or {}), **_mapping_of(quick["tune"], path, "quick.tune", quick)})
        merged["tune"].line = getattr(doc.get("tune"), "line", 0)
    return merged


def load_grid(path: str | Path, *, quick: bool = False, heldout: bool = False) -> GridSpec:
    """Read and check the grid at ``path`` (with ``quick``: its ``quick:`` subset; with ``heldout``: its
    ``heldout:`` seeds and data draw). Raises
    :class:`GridError` naming the entry for an unknown method, a missing config, a duplicated run
    name, an impossible stage chain, or a data kind a variant lacks."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file; pass --config experiments/paper.yaml or your own grid")
    try:
        doc = load_yaml(path)
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise GridError(f"{path}: a grid is a mapping with `variants`, `runs`, `seeds` and `evaluation`")
    _check_keys(doc, TOP_KEYS, path, "grid")
    _check_keys(_mapping_of(doc.get("heldout"), path, "heldout", doc), HELDOUT_KEYS, path, "heldout")
    if heldout:
        doc = _merge_heldout(doc, path)
    if quick:
        doc = _merge_quick(doc, path)
    data_seed = doc.get("data_seed", 0)
    if isinstance(data_seed, bool) or not isinstance(data_seed, int):
        raise GridError(
            _where(
                path,
                doc,
                f"data_seed must be an integer (the data draw, substituted for {DATA_SEED} in sources), got "
                f"{data_seed!r}",
            )
        )
    configs_dir = Path(doc.get("configs_dir") or "configs")
    if not configs_dir.is_absolute():
        configs_dir = next(
            (b / configs_dir for b in (Path.cwd(), path.parent, path.parent.parent) if (b / configs_dir).is_dir()),
            PACKAGE_CONFIGS,
        )
    variants = _variants(doc.get("variants"), path, doc)
    base = _base(doc.get("base"), path, doc, configs_dir)
    raw_runs = doc.get("runs")
    if not isinstance(raw_runs, list) or not raw_runs:
        raise GridError(_where(path, doc, "`runs` must be a non-empty list of {name, stages}"))
    runs: list[RunSpec] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_runs):
        what = f"runs[{index}]"
        entry = _mapping_of(raw, path, what, raw)
        name = entry.get("name")
        if not name or not isinstance(name, str):
            raise GridError(_where(path, raw, f"{what}: needs a `name` (a string)"))
        what = f"runs[{index}] {name!r}"
        check_path_name(name, _where(path, raw, what), "a run name")
        if name == BASE_RUN and doc.get("base") is not None:
            raise GridError(
                _where(
                    path,
                    raw,
                    f"{what}: the name {BASE_RUN!r} is the base stage's row (the grid has `base:`); rename the run",
                )
            )
        if name in seen:
            raise GridError(
                _where(
                    path, raw, f"{what}: duplicated run name (also at line {seen[name]}); give each run its own name"
                )
            )
        seen[name] = getattr(raw, "line", 0)
        _check_keys(entry, RUN_KEYS, path, what)
        raw_stages = entry.get("stages")
        if not isinstance(raw_stages, list):
            raise GridError(_where(path, raw, f"{what}: `stages` must be a list of {{method, data}}"))
        stages = [_stage(s, path, f"{what} stage {i + 1}", configs_dir) for i, s in enumerate(raw_stages)]
        stages = ([base] if base is not None else []) + stages
        check_chain(stages, _where(path, raw, what))
        run_variants = entry.get("variants") or list(variants)
        for variant in run_variants:
            if variant not in variants:
                raise GridError(
                    _where(path, raw, f"{what}: unknown variant {variant!r}; the grid defines {sorted(variants)}")
                )
            for i, stage in enumerate(stages):
                if stage.sources is None and stage.data not in variants[variant]:
                    raise GridError(
                        _where(
                            path,
                            raw,
                            f"{what} stage {i + 1} ({stage.method}): data kind {stage.data!r} is not defined in "
                            f"variant {variant!r} (it has {sorted(variants[variant])})",
                        )
                    )
        overrides = _mapping_of(entry.get("overrides"), path, f"{what}.overrides", raw)
        runs.append(
            RunSpec(
                name, str(entry.get("label") or name), stages, list(run_variants), overrides, getattr(raw, "line", 0)
            )
        )
    if base is not None:
        runs.insert(
            0, RunSpec(BASE_RUN, "base (pre-trained)", [base], list(variants), {}, getattr(doc.get("base"), "line", 0))
        )
    evaluation = _evaluation(doc.get("evaluation"), path, doc)
    if (
        evaluation.baseline is not None
        and evaluation.baseline not in seen
        and not quick
        and not (base is not None and evaluation.baseline == BASE_RUN)
    ):
        raise GridError(
            _where(
                path,
                doc.get("evaluation"),
                f"evaluation.baseline {evaluation.baseline!r} is not a run name; runs are {list(seen)}",
            )
        )
    launcher = str(doc.get("launcher") or "inprocess")
    problem = choice_problem("launcher", launcher, ("inprocess", "subprocess"))
    if problem is not None:
        raise GridError(_where(path, doc, problem))
    jobs = doc.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise GridError(_where(path, doc, f"jobs must be a whole number >= 1 (runs trained at a time), got {jobs!r}"))
    keep_checkpoints = doc.get("keep_checkpoints", False)
    if not isinstance(keep_checkpoints, bool):
        raise GridError(_where(path, doc, f"keep_checkpoints must be true or false, got {keep_checkpoints!r}"))
    variants = {
        v: {
            k: {split: str(_with_data_seed(src, data_seed)) for split, src in kinds.items()}
            for k, kinds in by_kind.items()
        }
        for v, by_kind in variants.items()
    }
    if base is not None and base.sources is not None:
        base.sources = {split: str(_with_data_seed(src, data_seed)) for split, src in base.sources.items()}
    evaluation.prompts, evaluation.golden = (
        str(_with_data_seed(evaluation.prompts, data_seed)),
        _with_data_seed(evaluation.golden, data_seed),
    )
    tune = _tune(doc.get("tune"), path, doc, variants)
    if tune is not None:
        tune.prompts = str(_with_data_seed(tune.prompts, data_seed))
    return GridSpec(
        path=path,
        name=str(doc.get("name") or path.stem),
        seeds=_seeds(doc.get("seeds", [0]), path, "seeds", doc),
        seed_keys=list(doc.get("seed_keys") or DEFAULT_SEED_KEYS),
        variants=variants,
        runs=runs,
        evaluation=evaluation,
        overrides=_mapping_of(doc.get("overrides"), path, "overrides", doc),
        launcher=launcher,
        jobs=jobs,
        keep_checkpoints=keep_checkpoints,
        output=doc.get("output"),
        tune=tune,
        tuned={str(k): dict(v or {}) for k, v in _mapping_of(doc.get("tuned"), path, "tuned", doc).items()},
        base=base,
        data_seed=data_seed,
    )
