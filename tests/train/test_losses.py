import torch
import torch.nn.functional as F

from pipeline.train.losses import false_negative_mask, in_batch_contrastive_loss


def _mask(groups, labels, pos_ids, anchor_ids, is_label, same_label=False):
    t = torch.tensor
    return false_negative_mask(t(groups), t(labels), t(pos_ids), t(anchor_ids), t(is_label), same_label)


def test_same_group_duplicate_text_and_label_answers_are_masked():
    # pair 0: product A (label 0), 1: product A again, 2: text -> label name 0, 3: product B (label 1),
    # 4: product C (label 0) whose positive text equals pair 3's positive.
    m = _mask(groups=[0, 0, 5, 1, 2], labels=[0, 0, 0, 1, 0], pos_ids=[10, 11, 12, 13, 13],
              anchor_ids=[20, 21, 22, 23, 24], is_label=[False, False, True, False, False])
    assert not m.diagonal().any()
    assert m[0, 1] and m[1, 0]  # same product cluster
    assert m[0, 2] and m[1, 2] and m[4, 2]  # "label 0" name is right for every label-0 anchor
    assert not m[3, 2]  # ... but a true negative for the label-1 product
    assert m[3, 4] and m[4, 3]  # identical positive texts
    assert not m[0, 3] and not m[0, 4]  # different products stay negatives


def test_anchor_text_appearing_as_another_positive_is_masked():
    m = _mask(groups=[0, 1], labels=[0, 1], pos_ids=[10, 20], anchor_ids=[20, 30], is_label=[False, False])
    assert m[0, 1]
    assert not m[1, 0]


def test_mask_same_label_option():
    m = _mask(groups=[0, 1, 2], labels=[0, 0, 1], pos_ids=[1, 2, 3], anchor_ids=[4, 5, 6],
              is_label=[False] * 3, same_label=True)
    assert m[0, 1] and m[1, 0] and not m[0, 2]


def test_without_mask_equals_multiple_negatives_ranking_loss():
    torch.manual_seed(0)
    a, p = torch.randn(6, 8), torch.randn(6, 8)
    expected = F.cross_entropy(F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T * 20, torch.arange(6))
    got = in_batch_contrastive_loss(a, p, scale=20.0, mask=torch.zeros(6, 6, dtype=torch.bool))
    assert torch.allclose(got, expected)
    from sentence_transformers.util import cos_sim

    assert torch.allclose(F.cross_entropy(cos_sim(a, p) * 20, torch.arange(6)), expected, atol=1e-6)


def test_masked_candidates_do_not_affect_the_loss():
    torch.manual_seed(1)
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 3] = True
    p[3] = a[0] * 10  # positive 3 is a perfect (false) negative for anchor 0: it would dominate row 0
    logits = (F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T) * 20
    # row 0 sees only candidates 0-2; the other rows see the whole batch
    rows = [F.cross_entropy(logits[:1, :3], torch.tensor([0]))]
    rows += [F.cross_entropy(logits[i:i + 1], torch.tensor([i])) for i in range(1, 4)]
    expected = torch.stack(rows).mean()
    assert torch.isclose(in_batch_contrastive_loss(a, p, mask=mask), expected)
    # and the mask is what keeps it out: unmasked, the false negative raises the loss
    assert in_batch_contrastive_loss(a, p) > expected + 0.1


def test_symmetric_loss_is_mean_of_both_directions():
    torch.manual_seed(2)
    a, p = torch.randn(5, 8), torch.randn(5, 8)
    one = in_batch_contrastive_loss(a, p)
    other = in_batch_contrastive_loss(p, a)
    assert torch.isclose(in_batch_contrastive_loss(a, p, symmetric=True), (one + other) / 2)


def test_extra_negatives_join_the_candidates_and_are_masked_like_positives():
    from pipeline.train.losses import contrastive_loss_with_negatives

    torch.manual_seed(3)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(2, 8)
    no_mask = torch.zeros(4, 4, dtype=torch.bool)
    # without negatives: exactly the in-batch loss
    assert torch.isclose(contrastive_loss_with_negatives(a, p, None, mask=no_mask),
                         in_batch_contrastive_loss(a, p, mask=no_mask))
    # with negatives: one softmax over the B positives and the N negatives
    scores = torch.cat([F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T,
                        F.normalize(a, dim=-1) @ F.normalize(n, dim=-1).T], dim=1) * 20
    expected = F.cross_entropy(scores, torch.arange(4))
    got = contrastive_loss_with_negatives(a, p, n, mask=no_mask, negative_mask=torch.zeros(4, 2, dtype=torch.bool))
    assert torch.isclose(got, expected)
    # a fully masked negative is as if it were absent
    masked = contrastive_loss_with_negatives(a, p, n, mask=no_mask,
                                             negative_mask=torch.tensor([[False, True]] * 4))
    assert torch.isclose(masked, contrastive_loss_with_negatives(a, p, n[:1], mask=no_mask,
                                                                 negative_mask=torch.zeros(4, 1, dtype=torch.bool)))


def test_hard_negative_mask_rules():
    from pipeline.train.losses import Tagged, hard_negative_mask

    t = torch.tensor
    # pairs: 0 (group 0, label 0), 1 (group 1, label 1); negatives: of group 0 / text == pair 1's positive /
    # the label-0 name / an unrelated text of label 0
    m = hard_negative_mask(Tagged(groups=t([0, 1]), labels=t([0, 1]), ids=t([20, 21]), is_label=t([False, False])),
                           anchor_ids=t([10, 11]),
                           negatives=Tagged(groups=t([0, 5, -1, 6]), labels=t([0, 1, 0, 0]), ids=t([30, 21, 40, 41]),
                                            is_label=t([False, False, True, False])))
    assert m.tolist() == [[True, False, True, False], [False, True, False, False]]
    same = hard_negative_mask(Tagged(t([0]), t([0]), t([20]), t([False])), t([10]),
                              Tagged(t([6]), t([0]), t([41]), t([False])), mask_same_label=True)
    assert same.tolist() == [[True]]
