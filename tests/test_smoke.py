import ulma_lightning


def test_public_names_importable() -> None:
    for name in ("ULMAModule", "PointwiseDPOModule", "PointwiseDataModule", "pointwise_dpo_loss", "ulma_loss"):
        assert hasattr(ulma_lightning, name), name
