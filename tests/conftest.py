"""Shared fixtures: a tiny image folder and a checkpoint trained on it (small, fast on 2 CPU cores)."""
import pytest

from helpers import make_folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_folder, tmp_path_factory):
    """A resnet18 (small stem, 24 px) trained for one epoch on tiny_folder."""
    from resnet_jax.training import train

    out = str(tmp_path_factory.mktemp("ckpt") / "r18")
    config = train.TrainConfig(model="resnet18", data=f"folder:{tiny_folder}", epochs=1, batch_size=8,
                               stem="small", image_size=24)
    train.fit(config, out, progress=False, log=lambda s: None)
    return out
