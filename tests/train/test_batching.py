import numpy as np

from pipeline.train.batching import epoch_batches


def test_batches_cover_every_pair_once_and_are_deterministic():
    lengths = np.random.default_rng(0).integers(5, 40, 1000)
    b1 = epoch_batches(lengths, 32, seed=0, epoch=0)
    b2 = epoch_batches(lengths, 32, seed=0, epoch=0)
    assert all((x == y).all() for x, y in zip(b1, b2))
    assert sorted(np.concatenate(b1).tolist()) == list(range(1000))
    b3 = epoch_batches(lengths, 32, seed=0, epoch=1)
    assert not all((x == y).all() for x, y in zip(b1, b3))


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(5, 60, 4000)

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    grouped = epoch_batches(lengths, 64, seed=0, epoch=0, length_grouping=True)
    plain = epoch_batches(lengths, 64, seed=0, epoch=0, length_grouping=False)
    assert padded(grouped) < 0.75 * padded(plain)
