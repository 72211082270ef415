"""Model architecture: parameter counts by shape only, a small compiled forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.core import models
from resnet_jax.errors import UserError

TORCHVISION_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_parameter_counts_match_torchvision(name):
    shapes = models.variable_shapes(models.create(name, 1000))
    assert models.count_params(shapes["params"]) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize("name,width", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.device
def test_intermediate_shapes_224(name, width):
    model = models.create(name, 7)
    variables = models.variable_shapes(model, 224)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    logits, inter = jax.eval_shape(lambda v, x: models.apply(model, v, x), variables, x)
    assert logits.shape == (2, 7)
    expansion = width // 512
    assert inter["stem"].shape == (2, 56, 56, 64)
    assert inter["layer1"].shape == (2, 56, 56, 64 * expansion)
    assert inter["layer2"].shape == (2, 28, 28, 128 * expansion)
    assert inter["layer3"].shape == (2, 14, 14, 256 * expansion)
    assert inter["layer4"].shape == (2, 7, 7, width)
    assert inter["pooled"].shape == (2, width)
    assert set(inter) == set(models.INTERMEDIATES)


def test_small_stem_keeps_resolution():
    model = models.create("resnet18", 10, stem="small")
    variables = models.variable_shapes(model, 24)
    _, inter = jax.eval_shape(lambda v, x: models.apply(model, v, x), variables,
                              jax.ShapeDtypeStruct((1, 24, 24, 3), jnp.float32))
    assert inter["stem"].shape == (1, 24, 24, 64)
    assert inter["layer4"].shape == (1, 3, 3, 512)
    # The small stem's conv1 is 3x3; the standard one 7x7.
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 64)


@pytest.mark.device
def test_forward_matches_manual_head_and_is_eval_mode_pure():
    model = models.create("resnet18", 5, stem="small")
    variables = models.init(model, jax.random.key(1), 24)
    x = jax.random.normal(jax.random.key(2), (3, 24, 24, 3))
    logits, inter = jax.jit(lambda v, x: models.apply(model, v, x))(variables, x)
    # The head is global average pooling then the fc layer.
    pooled = np.asarray(inter["layer4"]).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(inter["pooled"]), pooled, rtol=1e-5, atol=1e-6)
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(np.asarray(logits), pooled @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]),
                               rtol=1e-4, atol=1e-5)
    # Eval mode: each image's logits do not depend on the rest of the batch.
    single = models.apply(model, variables, x[1:2])[0]
    np.testing.assert_allclose(np.asarray(single)[0], np.asarray(logits)[1], rtol=1e-4, atol=1e-5)
    # Train mode updates the batch statistics.
    _, _, stats = models.apply(model, variables, x, train=True)
    before = np.asarray(variables["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(np.asarray(stats["bn1"]["mean"]), before)


def test_bad_model_and_images():
    with pytest.raises(UserError, match="unknown model 'resnet19'"):
        models.create("resnet19")
    with pytest.raises(UserError, match="unknown stem"):
        models.create("resnet18", stem="tiny")
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        models.validate_images(np.zeros((4, 32, 32)))
    with pytest.raises(UserError, match="expects 72x72"):
        models.validate_images(np.zeros((1, 64, 64, 3)), 72)
