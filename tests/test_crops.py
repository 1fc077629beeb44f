import math

import torch

from condense import crops


def test_random_resized_boxes_stay_inside_the_image_with_the_requested_area():
    g = torch.Generator().manual_seed(0)
    boxes = crops.random_resized_boxes(2000, (0.25, 0.5), (3 / 4, 4 / 3), g)
    top, left, height, width = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + height <= 1 + 1e-6).all() and (left + width <= 1 + 1e-6).all())
    area = height * width
    assert float(area.min()) >= 0.25 - 1e-4 and float(area.max()) <= 0.5 + 1e-4
    square = crops.random_resized_boxes(100, (0.1, 1.0), (1.0, 1.0), g)
    torch.testing.assert_close(square[:, 2], square[:, 3])


def test_crop_resize_of_the_whole_image_is_the_image_and_flip_mirrors_it():
    x = torch.randn(3, 2, 6, 6)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)
    torch.testing.assert_close(crops.crop_resize(x, whole, 6), x)
    flips = torch.tensor([True, False, True])
    mirrored = crops.crop_resize(x, whole, 6, flips)
    torch.testing.assert_close(mirrored[0], x[0].flip(-1))
    torch.testing.assert_close(mirrored[1], x[1])


def test_crop_resize_cuts_the_requested_quadrant():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    bottom_right = crops.crop_resize(x, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 2)
    torch.testing.assert_close(bottom_right, torch.tensor([[[[10.0, 11.0], [14.0, 15.0]]]]))


def test_cutmix_boxes_have_beta_distributed_area_and_respect_the_probability():
    g = torch.Generator().manual_seed(0)
    boxes = crops.cutmix_boxes(4000, beta=1.0, prob=1.0, generator=g)
    area = boxes[:, 2] * boxes[:, 3]
    # lambda ~ Beta(1, 1) = U(0, 1): the unclipped box covers 1 - lambda, so the mean area is below 1/2.
    assert 0.2 < float(area.mean()) < 0.5
    never = crops.cutmix_boxes(100, beta=1.0, prob=0.0, generator=g)
    assert float(never.abs().sum()) == 0.0
    again = crops.cutmix_boxes(5, 1.0, 1.0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, crops.cutmix_boxes(5, 1.0, 1.0, torch.Generator().manual_seed(7)))


def test_cutmix_pastes_the_partner_region_only():
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    mixed = crops.cutmix(x, torch.tensor([1, 0]), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert float(mixed[0, 0, :2, :2].min()) == 1.0 and float(mixed[0, 0, 2:, :].max()) == 0.0
    assert float(mixed[1, 0, :2, :2].max()) == 0.0 and float(mixed[1, 0, 2:, :].min()) == 1.0
    assert torch.equal(crops.cutmix(x, torch.tensor([1, 0]), torch.zeros(4)), x)


def test_stitch_tiles_patches_and_shuffle_patches_permutes_the_grid():
    patches = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    images = crops.stitch(patches, 2)
    assert images.shape == (2, 1, 4, 4)
    assert images[0, 0, 0].tolist() == [0, 0, 1, 1] and images[0, 0, 3].tolist() == [2, 2, 3, 3]
    reversed_ = crops.shuffle_patches(images, torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3]]), 2)
    assert reversed_[0, 0, 0].tolist() == [3, 3, 2, 2]
    assert torch.equal(reversed_[1], images[1])
    assert torch.equal(crops.stitch(patches, 1), patches)
    assert math.isclose(float(crops.shuffle_patches(images, torch.zeros(2, 1), 1).sum()), float(images.sum()))
