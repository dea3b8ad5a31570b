"""Planning and training the stages of a grid: one ``ulma fit`` per stage, shared where identical.

A stage's identity (its folder under ``OUTPUT/stages/``) is a hash of its config, its options, its
seed, its data and the stage it starts from, so runs that share a stage (every "SFT then X" row and
the SFT row of the same variant and seed) train it once. A finished stage leaves ``stage.json``
(written atomically); a stage killed midway is resumed from its ``last.ckpt`` (``--ckpt_path``).
Stages read and tokenize a data set once: each gets ``--data.init_args.cache_dir OUTPUT/cache/features``
(unless the grid or its config sets ``cache_dir``), outside its identity, so the folders of stages
finished before the cache existed are still found.

Chains: a policy stage after a policy stage starts from that stage's exported model and uses it as
its reference (``policy.model`` and ``policy.reference_model``: the two-step SFT-then-DPO baseline).
A reward-model stage starts from the last policy stage before it (its weights, with a new scalar
head). A policy stage after a reward-model stage gets the reward model's export through its
``reward_arg`` (RLHF: reward model, then PPO) and starts from the last policy stage before it, if any.
With a grid's ``base:`` stage, every run's chain begins with it: trained once per seed, shared by
every run and variant (a stage's identity is what it trains, not the variant's name).

The untrained model of a run (its first stage's initial weights) is built once per distinct
``(model, model_config, tokenizer, dtype, init_seed)`` and exported like a trained one: it is the
"untrained" row, the other side of ``win_vs_untrained`` and the reference of the KL estimate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulma_lightning.compare.spec import GridSpec, RunSpec, StageSpec, tuning_keys

STAGE_FILE = "stage.json"
CACHE_DIR_KEY = "data.init_args.cache_dir"
#: where the stages of a grid share their tokenized data (``data.cache_dir``), under the output folder
FEATURE_CACHE = Path("cache") / "features"
INIT_FIELDS = ("model", "model_config", "tokenizer", "dtype", "init_seed", "trust_remote_code")
POLICY_PREFIX = "model.init_args.policy."


def cli_value(value: Any) -> str:
    """An override's value as ``ulma fit`` parses it (YAML/JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def options(overrides: dict[str, Any]) -> list[str]:
    """``--key value`` arguments from dotted overrides, in order."""
    out: list[str] = []
    for key, value in overrides.items():
        out += [f"--{key}", cli_value(value)]
    return out


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a kill leaves the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _shown_path(path: Path) -> str:
    """A config path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Stage:
    """One ``ulma fit`` of the grid (shared by every run that contains it)."""

    key: str
    spec: StageSpec
    base_args: list[str]  # config, overrides, seed and data: everything but folders, chain and resume
    after: str | None  # the stage this one starts from (its predecessor in the chain)
    policy_from: str | None  # the policy stage whose export is the start and reference
    reward_from: str | None  # the reward stage whose export is passed through reward_arg
    logger_is_tensorboard: bool
    sets_cache_dir: bool = False  # the grid or the stage's config sets data.init_args.cache_dir itself

    def args(
        self, folder: Path, exports: dict[str, str], resume: str | None = None, cache_dir: Path | None = None
    ) -> list[str]:
        """The full ``ulma fit`` argument list, given the exports of the stages it depends on; with
        ``cache_dir``, the data module's feature cache (unless the grid or the config sets one)."""
        args = list(self.base_args)
        if cache_dir is not None and not self.sets_cache_dir:
            args += options({CACHE_DIR_KEY: str(cache_dir)})  # not in base_args: the stage's identity does not change
        if self.policy_from is not None:
            start = exports[self.policy_from]
            if (
                self.spec.role == "reward"
            ):  # a reward model starts from the policy's weights (a new scalar head); no reference
                args += options({POLICY_PREFIX + "model": start})
            else:
                args += options(
                    {POLICY_PREFIX + "model": start, POLICY_PREFIX + "reference_model": start}
                )  # model_config is then unused
        if self.reward_from is not None:
            args += options({self.spec.reward_arg: exports[self.reward_from]})
        args += ["--trainer.default_root_dir", str(folder)]
        if self.logger_is_tensorboard:
            args += options(
                {
                    "trainer.logger.init_args.save_dir": str(folder),
                    "trainer.logger.init_args.name": "tensorboard",
                    "trainer.logger.init_args.version": 0,
                }
            )
        if resume is not None:
            args += ["--ckpt_path", resume]
        return args


@dataclass
class Init:
    """The untrained model a run starts from: the first stage's policy settings."""

    key: str
    policy: dict[str, Any]


@dataclass
class Instance:
    """A run for one variant and seed: its stages, in order, and its untrained start."""

    run: RunSpec
    variant: str
    seed: int
    stages: list[str]
    init: str

    @property
    def id(self) -> str:
        return f"{self.run.name}/{self.variant}/seed{self.seed}"


@dataclass
class Plan:
    """Every stage, untrained model and run instance of a grid, in the order they run."""

    stages: dict[str, Stage] = field(default_factory=dict)
    inits: dict[str, Init] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)


def _config(path: Path) -> dict[str, Any]:
    from ulma_lightning.lightning_cli import read_config

    return read_config(path)


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _is_tensorboard(config: dict[str, Any], overrides: dict[str, Any]) -> bool:
    logger = overrides.get("trainer.logger", _dotted(config, "trainer.logger"))
    return isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("TensorBoardLogger")


def initial_policy(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The policy settings that fix a stage's initial weights (config, then dotted overrides)."""
    policy = dict(_dotted(config, "model.init_args.policy") or {})
    for key, value in overrides.items():
        if key.startswith(POLICY_PREFIX):
            policy[key[len(POLICY_PREFIX) :]] = value
    return {k: policy.get(k) for k in INIT_FIELDS if k in policy}


def plan_grid(grid: GridSpec) -> Plan:
    """Expand the grid into stages (deduplicated), untrained models and run instances."""
    plan = Plan()
    for run in grid.runs:
        for variant in run.variants:
            for seed in grid.seeds:
                seed_overrides = {key: seed for key in grid.seed_keys}
                keys: list[str] = []
                init_key = ""
                last_policy: str | None = None
                last_reward: str | None = None
                for index, (spec, tuning_key) in enumerate(zip(run.stages, tuning_keys(run.stages))):
                    tuned = (
                        {} if spec.sources is not None else grid.tuned.get(tuning_key, grid.tuned.get(spec.method, {}))
                    )
                    overrides = {**grid.overrides, **tuned, **run.overrides, **spec.overrides, **seed_overrides}
                    if spec.sources is not None:  # the base stage: its own data, and the grid's options only
                        overrides = {**grid.overrides, **spec.overrides, **seed_overrides}
                    sources = spec.sources if spec.sources is not None else grid.variants[variant][spec.data]
                    data = {f"data.init_args.{split}": source for split, source in sources.items()}
                    base = ["fit", "--config", _shown_path(spec.config), *options(overrides), *options(data)]
                    config = _config(spec.config)
                    if index == 0:
                        policy = initial_policy(config, overrides)
                        init_key = f"untrained-seed{seed}-{digest(policy)}"
                        plan.inits.setdefault(init_key, Init(init_key, policy))
                    after = keys[-1] if keys else None
                    key = f"{spec.method}-seed{seed}-{digest(base, after)}"  # what it trains, not the variant's name
                    if key not in plan.stages:
                        plan.stages[key] = Stage(
                            key, spec, base, after,
                            policy_from=last_policy,  # a reward model starts from the policy before it too
                            reward_from=last_reward if spec.role == "policy" else None,
                            logger_is_tensorboard=_is_tensorboard(config, overrides),
                            sets_cache_dir=(
                                CACHE_DIR_KEY in overrides or "cache_dir" in (_dotted(config, "data.init_args") or {})
                            ),
                        )  # fmt: skip
                    keys.append(key)
                    if spec.role == "reward":
                        last_reward = key
                    else:
                        last_policy, last_reward = key, None
                plan.instances.append(Instance(run, variant, seed, keys, init_key))
    return plan


# ----------------------------------------------------------------------------- running
def find_latest(folder: Path, pattern: str) -> Path | None:
    """The most recently written file matching ``pattern`` under ``folder``."""
    found = [p for p in folder.rglob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_scalar(folder: Path, tag: str) -> float | None:
    """The last value of a TensorBoard scalar logged anywhere under ``folder`` (None if absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    value: tuple[float, float] | None = None
    for events in folder.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            last = accumulator.Scalars(tag)[-1]
            if value is None or last.wall_time > value[0]:
                value = (last.wall_time, last.value)
    return None if value is None else value[1]


#: loggers whose INFO lines (accelerator summary, "Seed set to", "`Trainer.fit` stopped") repeat per stage
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def quiet_output() -> Callable[[], None]:
    """What a grid with progress bars off asks of its stages: no download/shard-writing/weight-loading
    bars (transformers and huggingface_hub, here and in child processes) and no per-stage INFO lines
    from Lightning; warnings and errors still show, and ``ulma compare``'s own progress lines. Returns
    a function that puts everything back (for a compare run inside a longer-lived process)."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    saved = (
        os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"),
        are_progress_bars_disabled(),
        hf_logging.is_progress_bar_enabled(),
        {n: logging.getLogger(n).level for n in QUIET_LOGGERS},
    )
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # child processes (--launcher subprocess, --jobs workers)
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    def restore() -> None:
        env, hub_disabled, hf_enabled, levels = saved
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env
        if not hub_disabled:
            enable_progress_bars()
        if hf_enabled:
            hf_logging.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    return restore


def launch(args: list[str], launcher: str, log_file: Path) -> None:
    """Run ``ulma <args>`` in this process (``inprocess``) or in a child process (``subprocess``,
    output to ``log_file``). Raises on failure, with the child's last lines."""
    if launcher == "subprocess":
        with open(log_file, "w") as handle:
            code = subprocess.call(
                child_command(args), stdout=handle, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(os.getpid())
            )
        if code != 0:
            tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise RuntimeError(f"`ulma {args[0]}` exited with status {code}; the end of {log_file}:\n{tail}")
        return
    from ulma_lightning.cli import main

    argv, stderr = sys.argv, sys.stderr
    sys.argv = ["ulma"]  # LightningCLI reads the program name from here
    sys.stderr = tee = _Tee(stderr)  # keep what the parser says, to record it with the failure
    try:
        cli = main(args)
    except SystemExit as exc:
        if exc.code == 2:  # jsonargparse refused an option: this stage fails, the others go on
            raise RuntimeError(f"`ulma {args[0]}` refused its options: {parser_error(tee.lines)}") from None
        # Ctrl-C (Lightning exits with 1 after a graceful shutdown) or SIGTERM: stop the whole compare
        raise SystemExit(
            f"ulma compare: `ulma {args[0]}` was interrupted; run the same command again to resume"
        ) from None
    finally:
        sys.argv, sys.stderr = argv, stderr
    stopped = getattr(
        getattr(cli, "trainer", None), "received_sigterm", False
    )  # Lightning ends the fit early on SIGTERM
    del cli
    _release_memory()
    if stopped:
        raise SystemExit(
            f"ulma compare: stopped by SIGTERM during `ulma {args[0]}`; run the same command again to resume"
        )


def child_command(args: list[str]) -> list[str]:
    """The command line of ``ulma <args>`` in a child process (``--launcher subprocess``)."""
    return [sys.executable, "-m", "ulma_lightning.cli", *args]


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process ends, however it ends
    (Linux ``prctl(PR_SET_PDEATHSIG)``): a killed ``ulma compare`` leaves no ``ulma fit`` training
    beside the rerun. None where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before the call above
            os._exit(1)

    return preexec


def parser_error(lines: list[str], context: int = 3) -> str:
    """What an argument parser said when it refused options: its ``error:`` line first (the usage
    text before it is left out), then the few lines after the usage."""
    text = [line.rstrip() for line in lines if line.strip()]
    errors = [line for line in text if line.lstrip().startswith("error:")]
    if not errors:
        return "\n".join(text[-12:])
    after_usage = [line for line in text if not line.startswith((" ", "usage:")) and line not in errors]
    return "\n".join([errors[-1].strip(), *after_usage[-context:]])


def _release_memory() -> None:
    """Free what a finished in-process fit left behind (its trainer, model, GPU cache)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Tee:
    """A stream that writes through to ``stream`` and keeps the last lines written."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines = (self.lines + text.splitlines(keepends=True))[-50:]
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def stage_done(root: Path, key: str) -> dict[str, Any] | None:
    """The record (``stage.json``) of stage ``key`` under ``root`` if it finished; else None."""
    record = read_json(root / "stages" / key / STAGE_FILE)
    return record if record is not None and record.get("status") == "ok" else None


def train_stage(
    stage: Stage, root: Path, exports: dict[str, str], launcher: str, keep_checkpoints: bool = False
) -> dict[str, Any]:
    """Train ``stage`` (resuming a killed attempt from its newest ``last*.ckpt``); returns its record,
    also written to ``stage.json``. A stage already done is not trained again. The stages share
    their tokenized data through ``OUTPUT/cache/features`` (``data.cache_dir``). Once the stage is
    recorded done, its checkpoints (only there to resume it) are deleted unless ``keep_checkpoints``:
    its ``hf_model`` export is what later stages and the evaluation read."""
    done = stage_done(root, stage.key)
    if done is not None:
        return done
    folder = root / "stages" / stage.key
    folder.mkdir(parents=True, exist_ok=True)
    last = find_latest(folder, "last*.ckpt")  # Lightning names a later `last` last-v1.ckpt when last.ckpt exists
    args = stage.args(folder, exports, resume=str(last) if last else None, cache_dir=root / FEATURE_CACHE)
    command = "ulma " + shlex.join(args)
    (folder / "command.txt").write_text(command + "\n")
    started = time.perf_counter()
    launch(args, launcher, folder / "fit.log")
    seconds = time.perf_counter() - started
    export = find_latest(folder, "hf_model/config.json")
    if export is None:
        raise RuntimeError(
            f"stage {stage.key} ({stage.spec.config}) wrote no Hugging Face export; add "
            "ulma_lightning.callbacks.HFExport to the config's trainer.callbacks"
        )
    record = {
        "status": "ok",
        "key": stage.key,
        "method": stage.spec.method,
        "role": stage.spec.role,
        "config": str(stage.spec.config),
        "command": command,
        "resumed_from": str(last) if last else None,
        "seconds": seconds,
        "tokens_per_sec": read_scalar(folder, "train/tokens_per_sec_epoch"),
        "reward_accuracy": read_scalar(folder, "val/rewards/accuracy")
        if stage.spec.role == "reward"
        else None,  # held-out pairs ranked right
        "export": str(export.parent),
        "tensorboard": str(folder),
        "checkpoints": "kept" if keep_checkpoints else "deleted",
    }
    write_json(folder / STAGE_FILE, record)
    if not keep_checkpoints:
        remove_checkpoints(folder)
    return record


def remove_checkpoints(folder: Path) -> None:
    """Delete every ``*.ckpt`` under ``folder``: files, and the folders a sharded (FSDP2) save writes."""
    for path in sorted(folder.rglob("*.ckpt"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def build_init(init: Init, root: Path) -> dict[str, Any]:
    """Export the untrained model ``init`` (once); returns its record (``init.json``)."""
    folder = root / "stages" / init.key
    done = read_json(folder / "init.json")
    if done is not None:
        return done
    from ulma_lightning.export import export_hf
    from ulma_lightning.policy import Policy, PolicyConfig

    policy = Policy(PolicyConfig(**{**init.policy, "reference": "none"}))
    policy.build()
    export_hf(policy.model, policy.tokenizer, folder / "hf_model")
    record = {"status": "ok", "key": init.key, "policy": init.policy, "export": str(folder / "hf_model")}
    write_json(folder / "init.json", record)
    return record


def failure(exc: BaseException, max_lines: int = 12) -> str:
    """The error of a failed run for results files: the exception (first lines) and where it was raised."""
    lines = f"{type(exc).__name__}: {exc}".splitlines()
    text = "\n".join(lines[:max_lines] + (["..."] if len(lines) > max_lines else []))
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += f"\n(raised at {frames[-1].filename}:{frames[-1].lineno})"
    return text
