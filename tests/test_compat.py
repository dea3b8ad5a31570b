"""Every private API of another library the package uses lives in ``ulma_lightning/_compat.py`` (issue 28,
item 4). Each of its functions is checked here against the versions of ``_compat.CHECKED`` (lightning
2.6, torch 2.13, transformers 5.25, jsonargparse 4.53): when one of them is upgraded, the version test
fails first, and the behaviour tests say which function broke."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from argparse import ArgumentError
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_LLAMA
from lightning.pytorch.demos.boring_classes import BoringModel

import ulma_lightning
from ulma_lightning import _compat

PACKAGE = Path(ulma_lightning.__file__).parent


def private_uses() -> set[str]:
    """``X._name`` reads of names the package does not define, imports of ``_private`` modules or names of
    other libraries, and ``getattr(x, "_name")``, in every module but ``_compat.py``."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                or isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Store)
            ):
                own.add(node.attr if isinstance(node, ast.Attribute) else node.id)
            elif isinstance(node, ast.alias):
                own.add((node.asname or node.name).split(".")[0])
    hooks = {name for _, name in _compat.PRIVATE_HOOKS}
    found = set()
    for path, tree in trees.items():
        if path.name == "_compat.py":
            continue
        where = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("ulma_lightning"):
                if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")) or any(
                    a.name.startswith("_") and not a.name.startswith("__") for a in node.names
                ):
                    found.add(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                found |= {
                    f"{where}: import {a.name}"
                    for a in node.names
                    if not a.name.startswith("ulma_lightning")
                    and any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))
                }
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in own and node.attr not in hooks and ast.unparse(node.value) not in ("os", "sys"):
                    found.add(f"{where}: {ast.unparse(node)}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
            ):
                name = node.args[1]
                if (
                    isinstance(name, ast.Constant)
                    and isinstance(name.value, str)
                    and name.value.startswith("_")
                    and not name.value.startswith("__")
                    and name.value not in own
                ):
                    found.add(f"{where}: {ast.unparse(node)}")
    return found


def test_no_private_api_outside_compat() -> None:
    assert private_uses() == set()


def test_the_private_methods_overridden_are_the_listed_ones_and_still_exist() -> None:
    """A class here that overrides another library's private method is listed in ``PRIVATE_HOOKS``;
    each listed method still exists on that class (a rename would silently stop the override)."""
    overridden = set()
    for info in pkgutil.walk_packages(ulma_lightning.__path__, "ulma_lightning."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            for name in vars(cls):
                if (
                    name.startswith("_")
                    and not name.startswith("__")
                    and name not in ("_abc_impl", "_is_protocol", "_backward_cls")
                ):
                    for base in cls.__mro__[1:]:
                        if not base.__module__.startswith("ulma_lightning") and name in vars(base):
                            overridden.add((base, name))
    listed = set()
    for (path, name), _why in _compat.PRIVATE_HOOKS.items():
        module, _, cls_name = path.rpartition(".")
        base = getattr(importlib.import_module(module), cls_name)
        assert callable(getattr(base, name, None)), f"{path}.{name} is gone: re-check the override ({_why})"
        listed |= {(owner, name) for owner in base.__mro__ if name in vars(owner)}
    assert overridden <= listed, f"overridden private methods not in _compat.PRIVATE_HOOKS: {overridden - listed}"


@pytest.mark.parametrize("library", sorted(_compat.CHECKED))
def test_installed_versions_are_the_checked_ones(library: str) -> None:
    installed = ".".join(version(library).split(".")[:2])
    assert installed == _compat.CHECKED[library], (
        f"{library} {installed} is installed; _compat.py was checked against {_compat.CHECKED[library]}: "
        "re-check it, then update CHECKED"
    )


# ----------------------------------------------------------------------------- Lightning 2.6


class Doubling(BoringModel):
    def double(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.integration
def test_lightning_2_6_trainer_state_and_logging_step() -> None:
    """``attached_trainer``, ``train_loader_built``, ``logs_this_step``, ``batches_that_stepped`` and
    ``forward_redirection`` read what they name during a 4-step fit that logs every 2 steps."""
    seen: list = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            seen.append(("train_start", _compat.train_loader_built(trainer)))

        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
            seen.append((trainer.global_step, _compat.logs_this_step(trainer), _compat.batches_that_stepped(trainer)))

    module = Doubling()
    assert _compat.attached_trainer(module) is None
    trainer = pl.Trainer(
        max_steps=4, log_every_n_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()], accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module)
    assert _compat.attached_trainer(module) is trainer
    assert seen == [("train_start", True), (1, False, 0), (2, True, 1), (3, False, 2), (4, True, 3)]
    assert _compat.forward_redirection(trainer.strategy, module, "double", torch.ones(2)).tolist() == [2.0, 2.0]


def test_lightning_2_6_model_checkpoint_and_fsdp_attributes() -> None:
    """``save_last_checkpoint``, ``record_checkpoint_saved`` and ``set_activation_checkpointing`` use
    these methods and set these attributes (setting a name Lightning no longer reads would do nothing)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy

    callback = ModelCheckpoint()
    assert {"_last_global_step_saved", "_last_checkpoint_saved"} <= set(vars(callback))
    for method in ("_should_skip_saving_checkpoint", "_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(callback, method))
    _compat.record_checkpoint_saved(callback, 7, "step7.ckpt")
    assert (callback._last_global_step_saved, callback._last_checkpoint_saved) == (7, "step7.ckpt")
    strategy = FSDPStrategy()
    assert "_activation_checkpointing_kwargs" in vars(strategy)
    _compat.set_activation_checkpointing(strategy, "policy")
    assert strategy._activation_checkpointing_kwargs == {"auto_wrap_policy": "policy"}


def test_jsonargparse_4_53_add_subcommand_lists_it_in_help() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="ulma")
    parser.add_subcommands().add_subcommand("fit", ArgumentParser())
    _compat.add_subcommand(parser, "export", "Write a checkpoint as a Hugging Face folder")
    assert "export" in parser.format_help() and "Write a checkpoint as a Hugging Face folder" in parser.format_help()


class Shape:
    def __init__(self, size: int = 1) -> None:
        self.size = size


class Box(Shape):
    def __init__(self, size: int = 1, depth: int = 2) -> None:
        super().__init__(size)
        self.depth = depth


def _switch_box_to_shape() -> Any:
    """Parse a ``Box`` with ``depth: 5``, then ``--shape.class_path Shape`` (which has no ``depth``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--shape", type=Shape)
    box = json.dumps({"class_path": f"{__name__}.Box", "init_args": {"depth": 5}})
    return parser.parse_args(["--shape", box, "--shape.class_path", f"{__name__}.Shape"]).shape


def test_jsonargparse_4_53_class_path_change_drops_init_args_and_on_class_path_change_sees_it() -> None:
    """jsonargparse drops the ``init_args`` a new ``class_path`` does not take without a word (what
    ``ulma`` refuses, ``lightning_cli.check_class_path_change``); ``on_class_path_change`` sees the
    options before and after the drop, and puts jsonargparse's function back afterwards."""
    from jsonargparse import _typehints

    original = _typehints.discard_init_args_on_class_path_change
    assert _switch_box_to_shape().as_dict() == {"class_path": f"{__name__}.Shape", "init_args": {"size": 1}}
    seen: list[tuple[Any, ...]] = []
    with _compat.on_class_path_change(lambda *change: seen.append(change)):
        assert _switch_box_to_shape().as_dict() == {"class_path": f"{__name__}.Shape", "init_args": {"size": 1}}
    # the options given before the switch, and what is left after it (the first call, Shape -> Box, drops nothing)
    assert [change for change in seen if change[2] != change[3]] == [
        (f"{__name__}.Box", f"{__name__}.Shape", {"depth": 5}, {})
    ]
    assert _typehints.discard_init_args_on_class_path_change is original

    def refuse(old: str, new: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        if before != after:
            raise ValueError(f"{new} would drop {sorted(set(before) - set(after))}")

    with _compat.on_class_path_change(refuse), pytest.raises(ArgumentError, match=r"Shape would drop \['depth'\]"):
        _switch_box_to_shape()


# ----------------------------------------------------------------------------- torch 2.13


def test_torch_2_13_recompile_limit_only_rises() -> None:
    import torch._dynamo.config

    before = torch._dynamo.config.recompile_limit
    # dynamo's own patch puts the setting back (monkeypatch's undo left the config without it, and
    # test_compile.py failed when it ran after this file)
    with torch._dynamo.config.patch(recompile_limit=8):
        _compat.raise_recompile_limit(64)
        _compat.raise_recompile_limit(16)
        assert torch._dynamo.config.recompile_limit == 64
    assert torch._dynamo.config.recompile_limit == before


def test_torch_2_13_is_compiled_sees_module_compile() -> None:
    layer = torch.nn.Linear(2, 2)
    assert not _compat.is_compiled(layer)
    layer.compile()  # compiles lazily, at the first call: nothing is compiled here
    assert _compat.is_compiled(layer)


def test_torch_2_13_sharded_checkpoint_is_read_in_one_process(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "optimizer": {"lr": torch.tensor(0.1)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    loaded = _compat.load_sharded_state_dict(tmp_path, {"state_dict"})
    assert set(loaded) == {"state_dict"}
    torch.testing.assert_close(loaded["state_dict"]["w"], state["state_dict"]["w"])


# ----------------------------------------------------------------------------- transformers 5.25


def test_transformers_5_25_no_split_modules_names_the_decoder_block() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    assert _compat.no_split_modules(model) == ["LlamaDecoderLayer"]
    assert _compat.no_split_modules(torch.nn.Linear(2, 2)) == []
