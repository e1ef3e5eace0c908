"""Probe metrics against hand computations; heads, losses and schedules against their definitions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitup_cli.probe.heads import DepthHead, LinearHead, depth_loss, gradient_loss, lr_at, sig_loss
from vitup_cli.probe.metrics import (
    DepthMetrics,
    SegMetrics,
    confusion_matrix,
    depth_errors,
    majority_baseline,
    seg_scores,
)


# -- segmentation ---------------------------------------------------------------------------------
def test_confusion_and_scores_by_hand():
    """4 classes; class 2 is predicted but absent from the ground truth (IoU 0, counted); class 3 is
    neither (no IoU, left out of the mean); 255 pixels are ignored whatever is predicted there."""
    target = np.array([0, 0, 0, 1, 1, 255, 255, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 3, 0, 0, 1, 1])
    conf = confusion_matrix(pred, target, 4)
    want = np.zeros((4, 4), int)
    want[0, 0], want[0, 1] = 3, 1  # gt 0: predicted 0,0,1,0
    want[1, 1], want[1, 2] = 3, 1  # gt 1: predicted 1,2,1,1
    np.testing.assert_array_equal(conf, want)
    s = seg_scores(conf)
    iou0 = 3 / (4 + 3 - 3)  # TP 3, GT 4, predicted 3
    iou1 = 3 / (4 + 4 - 3)  # TP 3, GT 4, predicted 4 (three 1s and the 0->1)
    assert s.iou[0] == pytest.approx(iou0) and s.iou[1] == pytest.approx(iou1)
    assert s.iou[2] == 0 and math.isnan(s.iou[3])
    assert s.miou == pytest.approx((iou0 + iou1 + 0) / 3)
    assert s.accuracy == pytest.approx(6 / 8) and s.pixels == 8
    assert s.present == [True, True, False, False]
    js = s.to_json(["a", "b", "c", "d"])
    assert js["per_class_iou"]["d"] is None and js["absent_classes"] == ["c", "d"]


def test_seg_metrics_accumulate_over_batches_and_shapes():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, (3, 7, 9))
    t[rng.random(t.shape) < 0.2] = 255
    p = rng.integers(0, 5, (3, 7, 9))
    m = SegMetrics(5)
    for i in range(3):
        m.update(torch.from_numpy(p[i]), torch.from_numpy(t[i]))
    np.testing.assert_array_equal(m.confusion, confusion_matrix(p, t, 5))
    keep = t != 255
    assert m.scores().accuracy == pytest.approx((p[keep] == t[keep]).mean())
    assert m.confusion.sum() == keep.sum()


def test_predictions_out_of_range_are_an_error():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([5]), np.array([0]), 3)


def test_majority_baseline():
    conf = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    cls, s = majority_baseline(np.array([10, 50, 3]), conf)
    assert cls == 1
    # predicting 1 everywhere: gt 0 (6 px) all wrong, gt 1 (4 px) right; IoU1 = 4/10, IoU0 = 0, class 2 absent
    assert s.accuracy == pytest.approx(0.4) and s.miou == pytest.approx((0 + 0.4) / 2)


# -- depth ----------------------------------------------------------------------------------------
def test_depth_errors_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # the 0 is invalid
    pred = np.array([[1.2, 1.0], [4.0, 9.0]])
    e = depth_errors(pred, gt)
    ratios = np.array([1.2, 2.0, 1.0])
    assert e["d1"] == pytest.approx((ratios < 1.25).mean())
    assert e["d2"] == pytest.approx((ratios < 1.25**2).mean())
    assert e["d3"] == pytest.approx((ratios < 1.25**3).mean())
    assert e["abs_rel"] == pytest.approx((0.2 / 1 + 1 / 2 + 0) / 3)
    assert e["rmse"] == pytest.approx(math.sqrt((0.04 + 1 + 0) / 3))
    assert depth_errors(pred, np.zeros((2, 2))) is None
    assert depth_errors(pred, np.full((2, 2), 12.0)) is None  # beyond max_depth


def test_depth_metrics_average_images():
    gt = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]], [[0.0, 0.0]]])
    pred = torch.tensor([[[1.0, 1.0]], [[3.0, 5.0]], [[1.0, 1.0]]])
    m = DepthMetrics()
    m.update(pred, gt)
    s = m.scores()
    assert s["images"] == 2  # the all-invalid image is skipped
    assert s["abs_rel"] == pytest.approx((0.25 + 0) / 2) and s["d1"] == pytest.approx((0.5 + 1) / 2)


# -- heads ----------------------------------------------------------------------------------------
def test_linear_head_equals_resize_then_conv():
    torch.manual_seed(0)
    head = LinearHead(16, 5)
    feats = torch.randn(2, 16, 7, 9)
    fast = head(feats, (28, 36))
    slow = head.conv(F.interpolate(feats, size=(28, 36), mode="bilinear", align_corners=False))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert head(feats, (7, 9)).shape == (2, 5, 7, 9)


def test_depth_head_is_the_jafar_recipe():
    torch.manual_seed(0)
    head = DepthHead(8, bins=16, min_depth=1e-3, max_depth=10)
    feats, cls = torch.randn(2, 8, 5, 5), torch.randn(2, 8)
    out = head(feats, cls, (10, 10))
    # the recipe, done the slow way: resize features, concatenate the normalised CLS, conv, relu+0.1, ...
    up = F.interpolate(feats, size=(10, 10), mode="bilinear", align_corners=False)
    tok = F.normalize(cls, dim=1)[:, :, None, None].expand(-1, -1, 10, 10)
    x = F.relu(head.conv(torch.cat([up, tok], 1))) + 0.1
    x = x / x.sum(1, keepdim=True)
    want = torch.einsum("bkhw,k->bhw", x, torch.linspace(1e-3, 10, 16)).unsqueeze(1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out.min() >= 1e-3 and out.max() <= 10
    assert DepthHead(8, use_cls=False)(feats, None, (5, 5)).shape == (2, 1, 5, 5)


def test_sig_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    gt = torch.tensor([[2.0, 2.0, 2.0, 0.0]])  # last pixel invalid
    g = torch.log(pred[0, :3] + 1e-3) - torch.log(gt[0, :3] + 1e-3)
    want = torch.sqrt(g.var() + 0.15 * g.mean() ** 2)
    torch.testing.assert_close(sig_loss(pred, gt), want)
    torch.testing.assert_close(sig_loss(pred, gt, warm_up=True), torch.sqrt(0.15 * g.mean() ** 2))
    assert sig_loss(pred * 0 + 2, gt) < 1e-6  # perfect prediction on the valid pixels


def test_gradient_loss_is_shift_invariant_in_log_space_and_per_image():
    gt = torch.rand(2, 12, 12) * 5 + 1
    # a constant log-ratio (pred = 2 * gt, up to eps) has no gradient error
    assert gradient_loss(2 * gt + 1e-3, gt + 0.0) < 1e-3
    bumpy = gt.clone()
    bumpy[0, 6, 6] *= 3
    assert gradient_loss(bumpy, gt) > 0.01
    # images do not interact: the loss of a batch of two identical images equals that of one
    one = gradient_loss(bumpy[:1], gt[:1])
    two = gradient_loss(torch.cat([bumpy[:1]] * 2), torch.cat([gt[:1]] * 2))
    torch.testing.assert_close(one, two)
    assert depth_loss(bumpy, gt) > sig_loss(bumpy, gt)


def test_gradient_loss_by_hand_on_a_tiny_map():
    pred = torch.tensor([[1.0, 1.0, 4.0]])
    gt = torch.tensor([[1.0, 1.0, 1.0]])
    d = torch.log(pred + 1e-3) - torch.log(gt + 1e-3)
    # stride 1: one horizontal pair (0, 2); 3 valid pixels. stride 2: columns 0, 2 -> no pair two apart
    want = (d[0, 0] - d[0, 2]).abs() / 3
    torch.testing.assert_close(gradient_loss(pred, gt), want)


# -- schedules ------------------------------------------------------------------------------------
def test_cosine_schedule_matches_torch_over_all_iterations():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    for step in range(30):
        assert lr_at(step, 2e-3, 30, 3) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12)
        opt.step()
        sched.step()
    assert lr_at(30, 2e-3, 30, 3) == pytest.approx(0)


def test_jafar_schedule_reproduces_the_per_batch_stepped_epoch_cosine():
    """JAFAR: CosineAnnealingLR(T_max=epochs) stepped every batch: the rate oscillates with period 2*epochs."""
    epochs = 4
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for step in range(25):
        assert lr_at(step, 5e-4, 25, epochs, "jafar") == pytest.approx(opt.param_groups[0]["lr"], abs=1e-10)
        opt.step()
        sched.step()
    assert lr_at(8, 1.0, 25, epochs, "jafar") == pytest.approx(1.0)  # back at the top after 2*epochs steps
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 10, 1, "linear")
