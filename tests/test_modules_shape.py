"""The modules' shape (issue 28): two sibling bases, ``AlignmentModule`` (offline, the supervised step) and
``RolloutModule`` (online, the rollout step), sharing the policy, optimizer, checkpoint and export pieces
by composition (``ulma_lightning.modules.shared``); every method at most 2 levels below LightningModule."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest

import ulma_lightning as U
from ulma_lightning.modules import METHOD_BASES, AlignmentModule, RolloutModule, rollout, shared

OFFLINE = [
    U.ULMAModule,
    U.PointwiseDPOModule,
    U.PointwiseModule,
    U.SFTModule,
    U.DPOModule,
    U.UnlikelihoodModule,
    U.KTOModule,
    U.RewardModelModule,
]
ONLINE = [U.PPOModule, U.RLOOModule, U.GRPOModule, U.OnlineULMAModule]
STEPS = ("training_step", "validation_step", "test_step")
#: the Lightning hooks both bases implement, each by calling the same function of ``modules.shared``
SHARED_HOOKS = {
    "configure_model": "configure_policy",
    "configure_optimizers": "with_schedule",
    "on_train_batch_end": "stop_at_max_steps",
    "predict_step": "predict",
    "on_save_checkpoint": "save_checkpoint",
    "on_load_checkpoint": "load_checkpoint",
}


def levels(cls: type) -> int:
    """Classes from ``cls`` down to LightningModule, ``cls`` included (``AlignmentModule``: 1)."""
    return cls.__mro__.index(pl.LightningModule)


def owner(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def test_the_two_bases_are_siblings() -> None:
    assert AlignmentModule.__bases__ == (pl.LightningModule,)
    assert RolloutModule.__bases__ == (pl.LightningModule,)
    assert not issubclass(RolloutModule, AlignmentModule) and not issubclass(AlignmentModule, RolloutModule)
    assert METHOD_BASES == (AlignmentModule, RolloutModule)


@pytest.mark.parametrize("cls", OFFLINE + ONLINE, ids=lambda c: c.__name__)
def test_every_method_is_at_most_two_levels_below_lightning_module(cls: type) -> None:
    assert levels(cls) == 2
    assert issubclass(cls, METHOD_BASES)


@pytest.mark.parametrize("cls", OFFLINE + ONLINE, ids=lambda c: c.__name__)
def test_each_method_runs_its_own_bases_steps(cls: type) -> None:
    base = RolloutModule if cls in ONLINE else AlignmentModule
    assert {name: owner(cls, name) for name in STEPS} == dict.fromkeys(STEPS, base)


def test_no_step_overrides_a_step_of_the_other_base() -> None:
    source = inspect.getsource(rollout)
    assert "ignore[override]" not in source
    for name in STEPS:  # the signatures are the bases' own: the online steps take prompt batches
        assert vars(RolloutModule)[name] is not vars(AlignmentModule)[name]


@pytest.mark.parametrize("base", METHOD_BASES, ids=lambda c: c.__name__)
def test_the_shared_hooks_are_the_shared_functions(base: type) -> None:
    for hook, function in SHARED_HOOKS.items():
        assert callable(getattr(shared, function))
        assert f"shared.{function}(" in inspect.getsource(vars(base)[hook]), (
            f"{base.__name__}.{hook} does not call shared.{function}"
        )


def test_ulma_takes_a_subclass_of_either_base_and_refuses_another_lightning_module(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI's model is a subclass of AlignmentModule or RolloutModule (``ULMAArgumentParser``): another
    LightningModule is refused by the parser, naming both bases, as it was with one base."""
    from conftest import REPO

    from ulma_lightning.cli import main

    with pytest.raises(SystemExit):  # --print_config prints and exits
        main(["fit", "--config", str(REPO / "configs" / "rloo.yaml"), "--print_config"])
    assert "class_path: ulma_lightning.RLOOModule" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "rloo.yaml"),
                "--model.class_path",
                "lightning.pytorch.demos.boring_classes.BoringModel",
                "--print_config",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "BoringModel does not correspond to a subclass of AlignmentModule" in err
        and "BoringModel does not correspond to a subclass of RolloutModule" in err
    )


def test_ulma_compare_takes_a_subclass_of_either_base() -> None:
    from conftest import REPO

    from ulma_lightning.compare.spec import GridError, _module_class

    for method, cls in (("ulma", U.ULMAModule), ("online_ulma", U.OnlineULMAModule), ("grpo", U.GRPOModule)):
        assert _module_class(REPO / "configs" / f"{method}.yaml", {}, "stage") == (
            f"ulma_lightning.{cls.__name__}",
            cls,
        )
    with pytest.raises(
        GridError,
        match=r"stage: lightning.pytorch.demos.boring_classes.BoringModel in .* is not an ulma-lightning method module "
        r"\(a subclass of AlignmentModule or RolloutModule\)",
    ):
        _module_class(
            REPO / "configs" / "ulma.yaml",
            {"model.class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
            "stage",
        )
