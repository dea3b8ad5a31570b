"""The ``ulma`` command's LightningCLI (:class:`ULMACLI`) and its helpers; the entry point that
dispatches to it and to the :data:`EXTRA_COMMANDS` is :mod:`ulma_lightning.cli`. Commands such as
``ulma evaluate`` build on :class:`ULMACLI` from here, so no module imports the entry point back."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import ulma_lightning._compat as _compat
from ulma_lightning.checkpointing import check_resume_options, check_same_classes, read_checkpoint_metadata
from ulma_lightning.evaluation.writer import PredictionWriter
from ulma_lightning.gguf_models import model_source
from ulma_lightning.importing import import_object
from ulma_lightning.noise import without_version_in_progress_bar
from ulma_lightning.options import UserError
from ulma_lightning.policy import default_tokenizer
from ulma_lightning.shipped import resolve_config_names
from ulma_lightning.threads import add_small_model_threads

HELP_EPILOG = (
    "The model's and the data's options depend on their class: `ulma fit --model.help ULMAModule` and "
    "`ulma fit --data.help PointwiseDataModule` list them (any class_path works), and `--print_config` "
    "prints every value of a config."
)
_SUBCLASS_GROUPS = ("model", "data")
_NULLS = ("null", "Null", "NULL", "~")


def _tokenizer_of(policy: Any) -> str:
    tokenizer = policy.get("tokenizer") if isinstance(policy, dict) else getattr(policy, "tokenizer", None)
    model = policy.get("model") if isinstance(policy, dict) else getattr(policy, "model", None)
    gguf_file = policy.get("gguf_file") if isinstance(policy, dict) else getattr(policy, "gguf_file", None)
    return default_tokenizer(tokenizer, model_source(model, gguf_file))


def nulls_as_init_args(argv: list[str]) -> list[str]:
    """Rewrite ``--model.init_args.a.b null`` (or ``--model.a.b=null``) as
    ``--model '{"init_args": {"a": {"b": null}}}'``.

    jsonargparse hands a nested option of a subclass-mode group on as the text ``--a.b=None``, so
    ``null`` arrived as the string 'None' (refused for a dict, taken as a name for a str); the
    equivalent JSON form keeps it a null.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        group, _, path = key[2:].partition(".")
        if not eq and i + 1 < len(argv):
            value = argv[i + 1]
        if (
            arg.startswith("--")
            and group in _SUBCLASS_GROUPS
            and path
            and not path.endswith("help")
            and value in _NULLS
        ):
            parts = path.split(".")
            if parts[0] == "init_args":
                parts = parts[1:]
            nested: Any = None
            for part in reversed(parts):
                nested = {part: nested}
            out += [f"--{group}", json.dumps({"init_args": nested})]
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out


#: The shared defaults of every run (trainer, logger, callbacks, the demo configs' tiny model), read
#: before any ``--config``: the configs in ``configs/`` state only what their method changes, and a
#: config or the command line overrides any default. Shipped inside the package.
DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")

#: options whose value is a mapping: a config's value replaces the default whole (the rest merge key by key)
MAPPING_VALUES = ("model_config",)


def merged(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``config`` over ``base``, as the CLI composes config files: namespaces merged key by key."""
    out = dict(base)
    for key, value in config.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and key not in MAPPING_VALUES
        out[key] = merged(out[key], value) if nested else value
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file as ``ulma fit --config`` reads it, as plain YAML data: the shared defaults
    (:data:`DEFAULTS_FILE`), then the file. (``callbacks+`` is left as written.)"""
    import yaml

    return merged(yaml.safe_load(DEFAULTS_FILE.read_text()) or {}, yaml.safe_load(Path(path).read_text()) or {})


class ULMAArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose ``model`` is a subclass of either method base: ``AlignmentModule``
    (offline) or ``RolloutModule`` (online), siblings (:data:`~ulma_lightning.modules.METHOD_BASES`).
    Another class is refused as it was with one base; a ``model:`` without ``class_path`` (the shared
    defaults) is read as ``AlignmentModule``'s, the first base."""

    def add_lightning_class_args(
        self, lightning_class: Any, nested_key: str, subclass_mode: bool = False, required: bool = True
    ) -> list[str]:
        if nested_key != "model" or not subclass_mode:
            return super().add_lightning_class_args(lightning_class, nested_key, subclass_mode, required)
        from ulma_lightning.modules import METHOD_BASES

        return self.add_subclass_arguments(METHOD_BASES, nested_key, fail_untyped=False, required=required)


CLI_DEFAULTS: dict[str, Any] = {
    "parser_class": ULMAArgumentParser,  # the model: a subclass of AlignmentModule or RolloutModule
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "seed_everything_default": 0,
    "save_config_kwargs": {"overwrite": True},
    "auto_configure_optimizers": False,
    "parser_kwargs": {
        command: {"default_config_files": [str(DEFAULTS_FILE)]} for command in ("fit", "validate", "test", "predict")
    },
}


#: Subcommands outside LightningCLI: name -> (``module:function`` called with the remaining
#: arguments, the one-line description ``ulma --help`` shows). Add a command by adding a row.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "export": (
        "ulma_lightning.export_cli:main",
        "Write a checkpoint (a file or a sharded FSDP folder) as a Hugging Face folder.",
    ),
    "evaluate": (
        "ulma_lightning.evaluation.evaluate:evaluate_main",
        "Test and generate with one checkpoint; print and save every metric.",
    ),
    "compare": (
        "ulma_lightning.compare.runner:compare_command",
        "Train and evaluate a grid of methods over seeds; write results.md, results.json and plots.",
    ),
    "configs": (
        "ulma_lightning.shipped:configs_main",
        "List the shipped configs (`--config NAME` uses one), or copy one to edit: `ulma configs cp ulma my.yaml`.",
    ),
}


class ConfigError(UserError):
    """An option a class of the config refused when it was built."""


def _innermost(err: BaseException, outside: BaseException | None = None) -> BaseException:
    """The first error of a chain (jsonargparse wraps a constructor's error in one that dumps the config),
    not counting ``outside`` and the errors it chains to (the error being handled when ``err`` was raised)."""
    while (err.__cause__ or err.__context__) not in (None, outside):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def model_error(model: Any, err: BaseException) -> BaseException:
    """The first error of ``err``'s chain; the error the model's own class raised, when that is the
    first base's refusal of it.

    jsonargparse builds the model against each base of ``METHOD_BASES`` in turn (:class:`ULMAArgumentParser`)
    and chains the first one's refusal (``... does not correspond to a subclass of AlignmentModule``) to the
    failure of a ``RolloutModule`` subclass; its constructor's error is then only text in the message. The
    model is built once more against its own base, to find that error (``cause`` if it builds)."""
    from ulma_lightning.modules import METHOD_BASES

    cause = _innermost(err)
    cls = _class_at(str(model.get("class_path")))
    bases = [base for base in METHOD_BASES[1:] if isinstance(cls, type) and issubclass(cls, base)]
    if not bases or "does not correspond to a subclass of" not in str(cause):
        return cause
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(bases[0], "model", fail_untyped=False)
    try:
        parser.instantiate_classes(
            parser.parse_object({"model": model.as_dict() if hasattr(model, "as_dict") else model})
        )
    except (ValueError, TypeError) as own:
        return _innermost(own, outside=err)
    return cause


def _built_class(err: BaseException) -> str | None:
    """The outermost class whose ``__init__`` (or dataclass ``__post_init__``) raised ``err``."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("__init__", "__post_init__") and "self" in frame.f_locals:
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _loggers(logger: Any) -> list[Any]:
    return [item for item in (logger if isinstance(logger, list) else [logger]) if hasattr(item, "init_args")]


def root_loggers_at_default_root_dir(trainer: Any) -> None:
    """Give each logger in the ``trainer`` config whose ``save_dir`` is unset the trainer's
    ``default_root_dir``, so that one option, ``--trainer.default_root_dir``, decides where a run
    writes its logs, checkpoints, saved config and ``hf_model`` (``<default_root_dir>/<name>/version_N``)."""
    root = trainer.get("default_root_dir") or os.getcwd()
    for logger in _loggers(trainer.get("logger")):
        if "save_dir" in logger.init_args and logger.init_args.save_dir is None:
            logger.init_args.save_dir = str(root)


def without_callbacks_turned_off(trainer: Any) -> None:
    """``enable_checkpointing: false`` drops checkpoint callbacks and ``logger: false`` the
    LearningRateMonitor, as Lightning leaves out its own default ones then (and refuses them given):
    the shared defaults' callbacks follow a config that turns checkpointing or logging off."""
    if not trainer.get("callbacks"):
        return
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    off = tuple(
        cls
        for cls, on in (
            (ModelCheckpoint, trainer.get("enable_checkpointing")),
            (LearningRateMonitor, trainer.get("logger")),
        )
        if on is False
    )
    if not off:
        return

    def turned_off(callback: Any) -> bool:
        cls = _class_at(str(callback.get("class_path"))) if hasattr(callback, "get") else None
        return isinstance(cls, type) and issubclass(cls, off)

    # `--trainer.callbacks CLASS` replaces the list by one callback, not a list of one
    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
    trainer.callbacks = [c for c in callbacks if not turned_off(c)]


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of a config (as plain data)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def name_the_option(message: str, config: Any) -> tuple[str, str | None]:
    """``message`` (``NAME must be RULE, got VALUE``, as :func:`~ulma_lightning.options.check_numbers`
    and the option classes write it) with the option's full path in the config: a class used under
    several options (``GenerationConfig`` as ``generation`` and ``eval_generation``) does not know
    which one it was built for. Returns the message, where the path replaces a ``NAME`` it does not
    end with, and the path to show beside it otherwise (None: no single option holds that value)."""
    import re

    match = re.match(r"([A-Za-z_][\w.]*) must be .*?, got (.+?)(?: \(|$)", message)
    if match is None:
        return message, None
    name, got = match.groups()
    try:
        plain = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    except (TypeError, ValueError):
        return message, None
    leaf = name.rpartition(".")[2]
    paths = [p for p, v in _leaves(plain) if re.split(r"[.\]]", p)[-1] == leaf and got in (str(v), repr(v))]
    if len(paths) != 1 or paths[0] == name:
        return message, None
    if paths[0].endswith("." + name):
        return message, paths[0]
    return message.replace(name, paths[0], 1), None


def _class_at(class_path: str) -> Any:
    """The object ``class_path`` names, or None when it cannot be imported."""
    try:
        return import_object(class_path)
    except ImportError:
        return None


def _defaults_of(class_path_: str) -> dict[str, Any]:
    """The constructor defaults of the class named ``class_path_`` (empty when it cannot be imported)."""
    cls = _class_at(class_path_)
    if cls is None:
        return {}
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a subclass passing **kwargs on takes its parents' options
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters.items()
            defaults.update({k: p.default for k, p in params if p.default is not inspect.Parameter.empty})
    return defaults


def check_dropped_init_args(before: dict[str, Any], after: dict[str, Any], old_class: str, new_class: str) -> None:
    """Refuse a ``class_path`` change that drops an option the old class had a non-default value for.

    jsonargparse keeps the ``init_args`` the new class accepts and drops the others without a word;
    ``ulma fit --config configs/ulma.yaml --model.class_path X`` with ``positive_term: beta_sft`` would
    train X as if the option had never been written. An option dropped at its old default changes
    nothing and only warns.
    """
    dropped = {k: v for k, v in before.items() if k not in after}
    if not dropped:
        return
    defaults = _defaults_of(old_class)
    meaningful = {k: v for k, v in dropped.items() if k not in defaults or defaults[k] != v}
    if meaningful:
        names = ", ".join(f"{k}={v!r}" for k, v in meaningful.items())
        raise ConfigError(
            f"{new_class} takes no option {names} that the config gives {old_class}: switching class_path would drop "
            f"it silently. Remove it from the config, or give {new_class} the option (a subclass takes its parent's "
            "options when its __init__ passes **kwargs on; see docs/extending.md)"
        )
    from ulma_lightning.modules import METHOD_BASES

    if (
        _class_at(old_class) in METHOD_BASES
    ):  # the base the shared defaults' model (no class_path) was read as: nothing written
        return
    warnings.warn(
        f"{new_class} takes no option {', '.join(sorted(dropped))}; the config gave {old_class} its default there, "
        "which is dropped with the class_path change",
        stacklevel=2,
    )


def _is_module_or_data(class_path: str) -> bool:
    """Whether ``class_path`` names a LightningModule or LightningDataModule (False if it does not import)."""
    cls = _class_at(class_path)
    return isinstance(cls, type) and issubclass(cls, (pl.LightningModule, pl.LightningDataModule))


def check_class_path_change(old_class: str, new_class: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    """:func:`check_dropped_init_args` for a switch of the model's or the data's class; a list given
    whole (``trainer.callbacks``) replaces its items position by position, which switches no one
    object's class, and is left alone."""
    if before and _is_module_or_data(old_class):
        check_dropped_init_args(before, after, old_class, new_class)


@contextmanager
def refuse_dropped_init_args() -> Iterator[None]:
    """While parsing, make jsonargparse's silent discard of ``init_args`` on a ``class_path`` change go
    through :func:`check_dropped_init_args` (:func:`~ulma_lightning._compat.on_class_path_change`)."""
    with _compat.on_class_path_change(check_class_path_change):
        yield


def drop_unused_model_config(model: Any) -> None:
    """Set ``policy.model_config`` to null where ``policy.model`` names the model: the shared
    defaults' demo architecture is ignored then, and the run's ``config.yaml``, ``hparams.yaml`` and
    TensorBoard's HPARAMS record what was trained, the named model, not the demo's config."""
    init_args: Any = model.get("init_args") if hasattr(model, "get") else None
    policy: Any = init_args.get("policy") if hasattr(init_args, "get") else None
    if hasattr(policy, "get") and policy.get("model") is not None and policy.get("model_config") is not None:
        policy["model_config"] = None


class _Console(logging.StreamHandler):
    """Messages only, on rank 0, to the ``sys.stderr`` of the moment (not the one it was built with,
    which a test's output capture may have closed since)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        return rank_zero_only.rank == 0 and bool(super().filter(record))


def show_data_report() -> None:
    """Print the data modules' report at the default verbosity, once, from rank 0: the INFO lines
    of ``ulma_lightning.data`` (each source's record format, samples per split, skipped records per
    reason, truncation and mix counts, cache use), which Python's logging otherwise drops."""
    logger = logging.getLogger("ulma_lightning.data")
    if not any(isinstance(handler, _Console) for handler in logger.handlers):
        logger.addHandler(_Console())
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


#: the files a run writes before its first step (TensorBoard's event file, the saved config and
#: hyperparameters): a log folder holding nothing else has nothing of a run in it
START_FILES = ("events.out.tfevents.*", "hparams.yaml", "config.yaml")


def unused_log_dir(log_dir: Path) -> bool:
    """Whether ``log_dir`` holds only what a run writes before its first step (:data:`START_FILES`)."""
    for path in log_dir.rglob("*"):
        if path.is_dir():
            continue
        if path.is_symlink() or not any(path.match(pattern) for pattern in START_FILES):
            return False
    return True


def new_log_dir(trainer: Any) -> list[Path]:
    """The log folder a run of ``trainer`` is about to create and its parents that do not exist yet,
    innermost first (empty when the log folder exists already, or off rank 0)."""
    if rank_zero_only.rank != 0 or not trainer.loggers:
        return []
    log_dir = getattr(trainer.loggers[0], "log_dir", None)  # the logger's own (the trainer's is a collective call)
    if not log_dir:
        return []
    folders = [Path(log_dir).absolute()]
    while not folders[-1].parent.exists():
        folders.append(folders[-1].parent)
    return [] if folders[0].exists() else folders


def remove_unused_log_dir(trainer: Any, created: list[Path]) -> None:
    """After a run failed before its first optimizer step: remove the log folder it created
    (``version_N`` with only an event file, a config; see :func:`new_log_dir`) and the parents it
    created that are left empty, so that the folder numbering and the README's next command
    (``--ckpt_path runs/ulma/version_0``) do not point at an empty run."""
    if not created or trainer.global_step > 0 or not created[0].is_dir() or not unused_log_dir(created[0]):
        return
    for logger in trainer.loggers:  # close the event file before removing it
        with contextlib.suppress(Exception):
            logger.finalize("failed")
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty: another run may have written there since


class ULMACLI(LightningCLI):
    """LightningCLI that links ``data.tokenizer`` to ``model.policy.tokenizer`` (or its model), adds
    the ``evaluation:`` section (a :class:`PredictionWriter` callback, active in ``predict``), roots
    loggers without a ``save_dir`` at ``trainer.default_root_dir``, prints the data report
    (:func:`show_data_report`), records no demo ``model_config`` beside a named ``policy.model``
    (:func:`drop_unused_model_config`), removes the log folder of a run that failed before its first
    step (:func:`remove_unused_log_dir`), refuses a ``class_path`` change that would drop a set option
    (:func:`check_dropped_init_args`), and lists :data:`EXTRA_COMMANDS` among the subcommands of
    ``ulma --help``."""

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run that fails before its first step leaves no log folder behind
        (:func:`remove_unused_log_dir`)."""
        log_dir = new_log_dir(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_unused_log_dir(self.trainer, log_dir)
            raise

    def _parse_ckpt_path(self) -> None:
        """Before LightningCLI puts the checkpoint's module class in the config, refuse a checkpoint
        of another module or data module class (see :func:`~ulma_lightning.checkpointing.check_same_classes`).

        ``fit`` resumes with the config as given, and refuses options that differ from the
        checkpoint's (:func:`~ulma_lightning.checkpointing.check_resume_options`; the module checks
        ``--ckpt_path last`` the same way when it loads it) instead of replacing them silently with
        the checkpoint's, as LightningCLI does; ``validate``, ``test`` and ``predict`` take the
        checkpoint's module options, as LightningCLI does."""
        subcommand = self.config.get("subcommand") or ""
        config = self.config.get(subcommand, None)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and Path(ckpt_path).exists() and ckpt_path != "last":
            checkpoint = read_checkpoint_metadata(ckpt_path)
            check_same_classes(checkpoint, config.model.class_path, config.data.class_path, str(ckpt_path))
            if subcommand == "fit":
                drop_unused_model_config(
                    config.model
                )  # as the run records it: no demo model_config beside policy.model
                check_resume_options(
                    checkpoint.get("hyper_parameters") or {}, config.model.get("init_args") or {}, str(ckpt_path)
                )
                return
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Build the classes; a class that refuses its options (``batch_size must be >= 1, got 0``)
        ends the output with its own message, not a dump of the whole config."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            config = self.config[self.subcommand] if self.subcommand else self.config
            cause = model_error(config.model, err)
            if cause is err:
                raise
            said, option = name_the_option(str(cause), config)
            where = f"option {option}; " if option else ""
            raise ConfigError(
                f"{_built_class(cause) or 'the config'}: {said} ({where}fix it in the config or on the command line)"
            ) from cause
        without_version_in_progress_bar(self.trainer)
        add_small_model_threads(self.trainer)

    def before_instantiate_classes(self) -> None:
        show_data_report()
        config = self.config[self.subcommand] if self.subcommand else self.config
        root_loggers_at_default_root_dir(config.trainer)
        without_callbacks_turned_off(config.trainer)
        drop_unused_model_config(config.model)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.init_args.policy", "data.init_args.tokenizer", compute_fn=_tokenizer_of)
        for name in ("label_type", "predict_inputs"):  # the method's declaration (MethodSpec), read once built
            parser.link_arguments(f"model.{name}", f"data.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "evaluation")
        parser.epilog = HELP_EPILOG

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as LightningCLI does, with ``null`` for a nested model/data option kept a null."""
        if args is None:
            sys.argv[1:] = nulls_as_init_args(resolve_config_names(sys.argv[1:]))
        elif isinstance(args, (list, tuple)):
            args = nulls_as_init_args(resolve_config_names(list(args)))
        with refuse_dropped_init_args():
            super().parse_arguments(parser, args)

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, (_, description) in EXTRA_COMMANDS.items():  # listed here, parsed by their own function
            _compat.add_subcommand(parser, name, description)
