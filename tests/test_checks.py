"""The package's one importer of dotted paths, one choice check and one row selector (issue 28, item 5):
what each does, and that no second copy of them grows back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from ulma_lightning.choices import check_choices, choice_problem
from ulma_lightning.importing import import_object
from ulma_lightning.losses import ulma_loss
from ulma_lightning.policy import select_rows

PACKAGE = Path(__file__).resolve().parents[1] / "ulma_lightning"


def sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))
    }


# ----------------------------------------------------------------------------- import_object


def test_import_object_reads_class_paths_and_entry_points() -> None:
    assert import_object("ulma_lightning.losses.ulma_loss") is ulma_loss
    assert import_object("ulma_lightning.losses:ulma_loss") is ulma_loss
    assert import_object("collections.OrderedDict").__name__ == "OrderedDict"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "ulma_lightning.losses.no_such_loss",
            "cannot import 'ulma_lightning.losses.no_such_loss': module 'ulma_lightning.losses' has no 'no_such_loss'",
        ),
        ("ulma_lightning.no_such_module.Thing", "No module named 'ulma_lightning.no_such_module'"),
        ("ULMAModule", "'ULMAModule' is not a dotted path; write package.module.Name"),
        ("ulma_lightning.losses:", "is not a dotted path"),
    ],
)
def test_import_object_names_what_is_missing(path: str, message: str) -> None:
    with pytest.raises(ImportError, match=message.replace(".", r"\.")):
        import_object(path)


def test_import_module_is_called_in_one_place() -> None:
    """Every dotted path of the package goes through :func:`import_object` (there were 7 copies)."""
    callers = sorted(
        name
        for name, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "import_module"
        or isinstance(node, ast.Name)
        and node.id == "__import__"
    )
    assert callers == [
        "ulma_lightning/gguf_models.py",
        "ulma_lightning/importing.py",
    ]  # gguf_models: a probe for installed packages


# ----------------------------------------------------------------------------- check_choices


def test_check_choices_names_the_option_the_choices_and_the_value() -> None:
    check_choices(loss_type=("ipo", ("sigmoid", "ipo")), variant=("authors", ("welleck", "authors")))
    with pytest.raises(ValueError, match=r"^loss_type must be 'sigmoid', 'ipo' or 'hinge', got 'dpo'$"):
        check_choices(loss_type=("dpo", ("sigmoid", "ipo", "hinge")))
    with pytest.raises(ValueError, match=r"^GRPOModule: scale_rewards must be 'group' or 'none', got 'batch'$"):
        check_choices("GRPOModule", loss_type=("grpo", ("grpo",)), scale_rewards=("batch", ("group", "none")))
    assert choice_problem("version", 3, (1, 2)) == "version must be 1 or 2, got 3"
    assert choice_problem("mode", "b", ("a",)) == "mode must be 'a', got 'b'"
    assert choice_problem("mode", "a", ("a",)) is None


def test_choices_are_read_from_their_literal_type_and_never_hand_written() -> None:
    """A choice option typed by a ``Literal`` alias (what ``--help`` lists and jsonargparse checks) is
    checked against ``get_args`` of that alias: no ``check_choices`` call restates its values, and no
    ``if``/``else`` chain ends in a message of its own (issue 28, items 3 and 5)."""
    literals = set()
    for tree in sources().values():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Subscript)
                and ast.unparse(node.value.value) == "Literal"
            ):
                values = node.value.slice.elts if isinstance(node.value.slice, ast.Tuple) else [node.value.slice]
                literals.add(tuple(value.value for value in values if isinstance(value, ast.Constant)))
    assert ("sft", "beta_sft", "pointwise_dpo") in literals and ("k1", "k3") in literals
    restated = []
    for name, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "check_choices":
                for keyword in node.keywords:
                    pair = keyword.value.elts if isinstance(keyword.value, ast.Tuple) else []
                    allowed = pair[1] if len(pair) == 2 and isinstance(pair[1], ast.Tuple) else None
                    if (
                        allowed is not None
                        and tuple(getattr(value, "value", None) for value in allowed.elts) in literals
                    ):
                        restated.append(f"{name}: {keyword.arg}")
    assert restated == []
    message = re.compile(r"must be '[^']*'(, '[^']*')* or '[^']*', got|must be one of")
    hand_written = [
        str(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "choices.py" and message.search(path.read_text())
    ]
    assert hand_written == []


def test_modules_and_data_check_their_choices_alike() -> None:
    """Options of a module, a loss, a data source and a comparison claim fail with one message shape."""
    from ulma_lightning.compare.stats import Effect, verdict
    from ulma_lightning.data.sources import read_source
    from ulma_lightning.rl import grpo_advantages

    with pytest.raises(ValueError, match=r"^scale_rewards must be 'group' or 'none', got 'batch'$"):
        grpo_advantages(torch.zeros(4), 2, scale_rewards="batch")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"^'task://binary\?stratified=maybe': stratified must be 'true', 'false', '1' or '0', got 'maybe'$",
    ):
        list(read_source("task://binary?stratified=maybe"))
    effect = Effect(0.1, 0.0, 0.2, 3, 100)
    with pytest.raises(ValueError, match=r"^claim: kind must be 'beats', 'at_least' or 'equivalent', got 'wins'$"):
        verdict(effect, None, kind="wins")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- select_rows


def right_padded() -> dict[str, torch.Tensor]:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ids = torch.arange(15).view(3, 5) * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "score": torch.tensor([1.0, 0.0, 0.5]),
        "step": torch.tensor(7),
    }


def test_select_rows_takes_a_mask_or_indices_and_trims_to_the_longest_kept() -> None:
    batch = right_padded()
    by_mask = select_rows(batch, torch.tensor([False, True, True]))
    by_index = select_rows(batch, torch.tensor([1, 2]))
    for sub in (by_mask, by_index):
        assert sorted(sub) == ["attention_mask", "input_ids", "labels", "score"]  # per-row tensors only
        assert sub["input_ids"].tolist() == [[5, 6, 0], [10, 11, 12]]
        assert sub["labels"].tolist() == [[5, 6, -100], [10, 11, 12]]
        assert sub["score"].tolist() == [0.0, 0.5]
    repeated = select_rows(batch, torch.tensor([1, 1]))  # KTO's partners may repeat a row
    assert repeated["input_ids"].tolist() == [[5, 6], [5, 6]]


def test_one_row_selector() -> None:
    """Sub-batches are cut by :func:`select_rows` alone (there were 3, two named ``take_rows``)."""
    selectors = sorted(
        f"{name}:{node.name}"
        for name, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and ("rows" in node.name and node.name.split("_")[0] in ("take", "select", "pick", "subset"))
    )
    assert selectors == ["ulma_lightning/policy.py:select_rows"]
