"""Training augmentations: alignment of image and label, each effect, config checks, per-sample seeding."""
import pytest
import torch

from rtda.config import AUGMENTATIONS, AugmentConfig, ConfigError, from_dict
from rtda.datasets.transforms import STEPS, Augment, augment_sample, build_augment, resize_label

H, W = 64, 128


def ramp_pair(axis: int):
    """label = pixel index along `axis` (x: -1, y: -2) and every image channel = 2 * label: label = f(image).

    Bilinear resizing keeps a linear ramp linear and nearest picks the source pixel under each centre, so
    after any rescale + crop + flip applied to both, |image - 2 * label| <= 1.5 everywhere (1 for the
    nearest/bilinear centre offset, 0.5 for rounding); a label one pixel off breaks it.
    """
    ramp = torch.arange((H, W)[axis]).to(torch.uint8)
    label = (ramp[None, :] if axis == -1 else ramp[:, None]).expand(H, W).contiguous()
    return (2 * label).expand(3, H, W).contiguous(), label


def misfit(image, label):
    keep = label != 255
    return (image.float() - 2 * label.float()).abs()[:, keep].max().item()


@pytest.mark.parametrize("scale_range", [[0.5, 0.5], [1.25, 2.0]])
@pytest.mark.parametrize("axis", [-1, -2])
def test_geometric_augmentations_keep_image_and_label_aligned(scale_range, axis):
    augment = Augment(AugmentConfig(hflip=0.5, scale_crop=1.0, scale_range=scale_range))
    for index in range(6):
        image, label = augment_sample(augment, *ramp_pair(axis), seed=0, epoch=0, index=index)
        assert image.dtype == torch.uint8 and image.shape == (3, H, W) and label.shape == (H, W)
        assert misfit(image, label) <= 1.5
        shifted = torch.roll(label, 1, dims=axis)
        assert misfit(image, shifted) > 1.5  # the check does see a one-pixel misalignment
        if scale_range[1] < 1:  # a shrunk image is padded bottom/right: image 0, label ignore
            assert (label[-1] == 255).all() and (image[:, -1] == 0).all()


def test_hflip_alone_is_exact():
    image, label = ramp_pair(-1)
    flipped, flipped_label = Augment(AugmentConfig(hflip=1.0))(image, label)
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(flipped_label, label.flip(-1))


def test_photometric_effects():
    gray = torch.full((3, H, W), 128, dtype=torch.uint8)
    label = torch.zeros(H, W, dtype=torch.uint8)

    out, out_label = Augment(AugmentConfig(noise=1.0, noise_std=8.0))(gray, label)
    assert out_label is label  # photometric augmentations leave the label alone
    assert abs((out.float() - 128).std().item() - 8.0) < 0.5

    out, _ = Augment(AugmentConfig(brightness=1.0, brightness_range=[0.5, 0.6]))(gray, label)
    assert out.unique().numel() == 1 and 64 <= out[0, 0, 0].item() <= 77

    colourful = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    out, _ = Augment(AugmentConfig(grayscale=1.0))(colourful, None)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])

    out, _ = Augment(AugmentConfig(blur=1.0, blur_sigma=[1.0, 1.0]))(colourful, None)
    assert out.float().std() < colourful.float().std() * 0.7  # white noise loses most of its variance

    out, _ = Augment(AugmentConfig(color_jitter=1.0, jitter_strength=0.5))(colourful, None)
    assert out.dtype == torch.uint8 and out.shape == colourful.shape and not torch.equal(out, colourful)


def test_probabilities_are_respected():
    image, label = ramp_pair(-1)
    never = Augment(AugmentConfig(hflip=0.0, blur_sigma=[2.0, 3.0]))
    assert all(torch.equal(never(image, label)[0], image) for _ in range(5))
    half = Augment(AugmentConfig(hflip=0.5))
    flips = sum(not torch.equal(augment_sample(half, image, label, 0, 0, i)[0], image) for i in range(200))
    assert 70 < flips < 130


def test_build_augment_and_config_errors():
    assert build_augment(AugmentConfig()) is None
    assert isinstance(build_augment(AugmentConfig(blur=0.5)), Augment)
    with pytest.raises(ConfigError, match=r"`data.augment.hflip` = 1.5 is out of range: expected a value in \[0, 1\]"):
        from_dict({"data": {"augment": {"hflip": 1.5}}})  # probabilities are checked when a config is loaded
    with pytest.raises(ConfigError, match=r"data.augment.scale_range = \[1.5, 0.5\]: expected \[low, high\]"):
        build_augment(AugmentConfig(scale_crop=0.5, scale_range=[1.5, 0.5]))
    with pytest.raises(ConfigError, match="data.augment.jitter_strength = 0.9"):
        build_augment(AugmentConfig(jitter_strength=0.9))


def test_per_sample_seed_is_reproducible_and_leaves_global_rng_alone():
    augment = Augment(AugmentConfig(scale_crop=1.0, color_jitter=1.0, noise=1.0))
    image, label = ramp_pair(-2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = augment_sample(augment, image, label, seed=5, epoch=2, index=9)
    assert torch.equal(torch.get_rng_state(), before)
    again = augment_sample(augment, image, label, seed=5, epoch=2, index=9)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in ((6, 2, 9), (5, 3, 9), (5, 2, 10)):
        assert not torch.equal(first[0], augment_sample(augment, image, label, *other)[0])


def test_resize_label_never_invents_values():
    label = torch.randint(0, 19, (H, W), dtype=torch.uint8)
    label[::7] = 255
    resized = resize_label(label, (H * 3 // 4, W * 5 // 4))
    assert set(resized.unique().tolist()) <= set(label.unique().tolist())


def test_every_augmentation_has_one_step_and_one_coin():
    """The steps table names exactly the config's augmentations; its order is the coin order of the stream."""
    assert sorted(STEPS) == sorted(AUGMENTATIONS)
    assert list(STEPS) == ["scale_crop", "hflip", "color_jitter", "brightness", "blur", "noise", "grayscale"]
