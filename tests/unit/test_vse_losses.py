"""VSE losses against independent loop implementations (VSE++ ContrastiveLoss semantics)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.vse.losses import hinge_loss, info_nce_loss


def ref_hinge(img, cap, margin, max_violation, image_ids=None):
    """Plain loops: for every positive pair (i, i), its caption negatives and image negatives."""
    n = img.shape[0]
    s = [[float(img[i] @ cap[j]) for j in range(n)] for i in range(n)]

    def is_negative(i, j):
        return i != j and (image_ids is None or image_ids[i] != image_ids[j])

    total = 0.0
    for i in range(n):
        # image i as the query: captions j as negatives (i2t)
        costs = [max(0.0, margin - s[i][i] + s[i][j]) for j in range(n) if is_negative(i, j)]
        total += (max(costs) if costs else 0.0) if max_violation else sum(costs)
        # caption i as the query: images j as negatives (t2i)
        costs = [max(0.0, margin - s[i][i] + s[j][i]) for j in range(n) if is_negative(j, i)]
        total += (max(costs) if costs else 0.0) if max_violation else sum(costs)
    return total


def ref_info_nce(img, cap, tau, image_ids=None):
    n = img.shape[0]
    total = 0.0
    for direction in (0, 1):
        for i in range(n):
            logits = []
            for j in range(n):
                if j != i and image_ids is not None and image_ids[i] == image_ids[j]:
                    continue
                s = float(img[i] @ cap[j]) if direction == 0 else float(img[j] @ cap[i])
                logits.append((s / tau, j == i))
            m = max(v for v, _ in logits)
            lse = m + math.log(sum(math.exp(v - m) for v, _ in logits))
            total += lse - next(v for v, pos in logits if pos)
    return total / (2 * n)


def _emb(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("margin", [0.2, 0.5])
@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (16, 2)])
def test_hinge_matches_loops(max_violation, margin, n, seed):
    img, cap = _emb(n, 5, seed)
    got = float(hinge_loss(img, cap, margin, max_violation))
    assert got == pytest.approx(ref_hinge(img, cap, margin, max_violation), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("max_violation", [False, True])
def test_hinge_masks_captions_of_the_same_image(max_violation):
    img, cap = _emb(9, 4, 3)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    img = img[ids] + 0.05 * _emb(9, 4, 4)[0]      # captions of one image share (nearly) its embedding
    got = float(hinge_loss(img, cap, 0.2, max_violation, image_ids=ids))
    assert got == pytest.approx(ref_hinge(img, cap, 0.2, max_violation, ids.tolist()), rel=1e-9, abs=1e-9)
    # without the mask, the same-image pairs count as violations
    assert float(hinge_loss(img, cap, 0.2, max_violation)) >= got


def test_hinge_zero_when_positives_win_by_the_margin():
    img = torch.eye(4, dtype=torch.float64)
    assert float(hinge_loss(img, img.clone(), 0.2, True)) == 0.0
    assert float(hinge_loss(img, img.clone(), 0.2, False)) == 0.0
    # margin larger than the gap (1 - 0): every negative violates by margin - 1
    assert float(hinge_loss(img, img.clone(), 1.5, False)) == pytest.approx(2 * 12 * 0.5)


def test_max_violation_gradient_reaches_only_the_hardest_negative():
    img, cap = _emb(5, 3, 7)
    img.requires_grad_(True)
    cap = cap.clone().requires_grad_(True)
    hinge_loss(img, cap, 10.0, True).backward()    # a huge margin: every pair violates
    s = (img @ cap.t()).detach()
    hardest = (s - torch.eye(5, dtype=s.dtype) * 1e9).argmax(1)
    # i2t: [m - S[i, i] + S[i, j*]]_+ -> d/d cap[j*] = img[i], d/d cap[i] = -img[i]
    expect = torch.zeros_like(cap)
    for i in range(5):
        expect[hardest[i]] += img[i].detach()
        expect[i] -= img[i].detach()
    s_t = s.t()
    hardest_img = (s_t - torch.eye(5, dtype=s.dtype) * 1e9).argmax(1)   # for caption j: hardest image
    for j in range(5):                       # t2i: [m - S[j, j] + S[i*, j]]_+ -> img[i*] - img[j]
        expect[j] += img[hardest_img[j]].detach() - img[j].detach()
    assert torch.allclose(cap.grad, expect, atol=1e-9)


@pytest.mark.parametrize("ids", [None, [0, 1, 1, 2, 3, 3]])
def test_info_nce_matches_loops(ids):
    img, cap = _emb(6, 4, 5)
    t = None if ids is None else torch.tensor(ids)
    got = float(info_nce_loss(img, cap, 0.1, image_ids=t))
    assert got == pytest.approx(ref_info_nce(img, cap, 0.1, ids), rel=1e-9)
