"""The batch stream against hand computations: its seeds, the stream of epoch permutations, each rank's rows,
label dropout at its threshold, the horizontal flip, and the layout and dtype of the numbers it hands out."""

import pytest
import torch

from sdeflow.core.mixture import NULL_LABEL
from sdeflow.training.stream import Batch, BatchStream, step_seed

CPU = torch.device("cpu")


def test_step_seed_is_the_documented_affine_hash():
    """Pinned: a change here changes every run's random numbers, and a resumed run would no longer continue its
    checkpoint's run bitwise."""
    assert step_seed(2, 3, 4, 5) == 2 * 1_000_003 + 3 * 7919 + 4 * 104_729 + 5 * 15_485_863
    assert step_seed(2, 3, 4) == step_seed(2, 3, 4, 0) == 2 * 1_000_003 + 3 * 7919 + 4 * 104_729
    assert step_seed(2**62, 0, 0) == 0 and step_seed(2**61, 0, 0) == 2**61  # modulo 2**62 (1_000_003 is odd)
    assert step_seed(0, 0, 3, 1) == 3 * 104_729 + 15_485_863


class Numbers(torch.utils.data.Dataset):
    """Item i is the number i (a 1×1×2 image [i + 1, −(i + 1)] or a vector [i]) with label i mod 3."""

    def __init__(self, n, image=False, flip=False):
        v = torch.arange(n, dtype=torch.float64)
        self.x = torch.stack([v + 1, -v - 1], -1)[:, None, None, :] if image else v[:, None]
        self.y = torch.arange(n) % 3
        self.horizontal_flip = flip

    def __len__(self):
        return len(self.x)


class Items(torch.utils.data.Dataset):
    """The same numbers served item by item, with an ``x`` attribute but no ``y``: the generic path."""

    def __init__(self, n):
        self.x = torch.arange(n, dtype=torch.float64)[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 3


def epochs(seed, n, count):
    return torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_033 + e)) for e in
                      range(count)])  # fmt: skip


def test_indices_follow_the_stream_of_epoch_permutations():
    s = BatchStream(Numbers(10), seed=7, micro=4, grad_accum=1, device=CPU)
    stream = epochs(7, 10, 3)
    for start, n in ((0, 4), (8, 4), (9, 1), (5, 15), (12, 3)):
        torch.testing.assert_close(s.indices(start, n), stream[start : start + n], msg=f"{start}+{n}")


def test_each_rank_takes_its_rows_of_the_global_micro_batch():
    ds, stream = Numbers(16), epochs(3, 16, 1).double()
    for rank in range(4):
        s = BatchStream(ds, seed=3, micro=8, grad_accum=2, device=CPU, rank=rank, world=4)
        b = s.batch(0, 1)  # micro-batch 1 of step 0: stream samples 8..15; rank r takes 8 + 2r, 9 + 2r
        torch.testing.assert_close(b.x[:, 0], stream[8 + 2 * rank : 10 + 2 * rank])
        assert (b.global_size, b.rows) == (8, slice(2 * rank, 2 * rank + 2))


def test_the_generic_dataset_path_gives_the_same_batch():
    a = BatchStream(Numbers(10), seed=1, micro=4, grad_accum=1, device=CPU, num_classes=3).batch(2, 0)
    b = BatchStream(Items(10), seed=1, micro=4, grad_accum=1, device=CPU, num_classes=3).batch(2, 0)
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.labels, b.labels)
    torch.testing.assert_close(a.labels, a.x[:, 0].long() % 3)


def test_each_micro_batch_draws_from_its_own_seed():
    s = BatchStream(Numbers(10), seed=4, micro=2, grad_accum=3, device=CPU)
    for step, micro, phase in ((0, 0, 0), (5, 2, 0), (5, 2, 1)):
        b = s.batch(step, micro) if phase == 0 else s.batch(step, micro, phase)
        assert b.generator.initial_seed() == step_seed(4, step, micro, phase)


def test_label_dropout_at_its_threshold_and_not_without_labels():
    """A label is dropped where the step's first uniform draw u₀ < p: with p set to one sample's u₀ exactly, that
    sample keeps its label and every sample below it loses it."""
    ds = Numbers(6)
    u0 = torch.rand((2, 6), generator=torch.Generator().manual_seed(step_seed(0, 0, 0)))[0]
    at = int(u0.argsort()[3])
    p = float(u0[at])  # the fourth smallest: three samples lie below it
    s = BatchStream(ds, seed=0, micro=6, grad_accum=1, device=CPU, num_classes=3, label_dropout=p)
    b = s.batch(0, 0)
    want = torch.where(u0 < p, torch.full((6,), NULL_LABEL), b.x[:, 0].long() % 3)
    torch.testing.assert_close(b.labels, want)
    assert b.labels[at] != NULL_LABEL and int((b.labels == NULL_LABEL).sum()) == 3
    assert BatchStream(ds, seed=0, micro=6, grad_accum=1, device=CPU).batch(0, 0).labels is None  # num_classes = 0
    kept = BatchStream(ds, seed=0, micro=6, grad_accum=1, device=CPU, num_classes=3).batch(0, 0)
    torch.testing.assert_close(kept.labels, kept.x[:, 0].long() % 3)


def test_horizontal_flip_mirrors_the_width_where_the_second_draw_is_below_one_half():
    ds = Numbers(8, image=True, flip=True)
    u1 = torch.rand((2, 8), generator=torch.Generator().manual_seed(step_seed(2, 0, 0)))[1]
    assert 0 < int((u1 < 0.5).sum()) < 8
    b = BatchStream(ds, seed=2, micro=8, grad_accum=1, device=CPU).batch(0, 0)
    i = b.x[:, 0, 0, 0].abs()  # which sample each row holds
    flipped = b.x[:, 0, 0, 0] < 0
    assert torch.equal(flipped, u1 < 0.5) and torch.equal(b.x[:, 0, 0, 1], torch.where(flipped, i, -i))
    plain = BatchStream(Numbers(8, image=True), seed=2, micro=8, grad_accum=1, device=CPU).batch(0, 0)
    assert (plain.x[:, 0, 0, 0] >= 0).all()  # no flip unless the dataset asks for it
    silent = Numbers(8, image=True)
    del silent.horizontal_flip  # a dataset that says nothing about flips is not flipped
    assert (BatchStream(silent, seed=2, micro=8, grad_accum=1, device=CPU).batch(0, 0).x[:, 0, 0, 0] >= 0).all()
    vectors = Numbers(8, flip=True)  # flips apply to images only
    v = BatchStream(vectors, seed=2, micro=8, grad_accum=1, device=CPU).batch(0, 0)
    assert (v.x >= 0).all()


class Images(torch.utils.data.Dataset):
    def __init__(self, n):
        self.x, self.y = torch.randn(n, 3, 2, 2), torch.zeros(n, dtype=torch.long)

    def __len__(self):
        return len(self.x)


def test_channels_last_layout_for_images_and_their_noise():
    ds = Images(4)
    b = BatchStream(ds, seed=0, micro=4, grad_accum=1, device=CPU, channels_last=True).batch(0, 0)
    assert b.channels_last and b.x.is_contiguous(memory_format=torch.channels_last)
    x = torch.zeros(4, 3, 2, 2)
    noise = Batch(x, None, torch.Generator(), 4, slice(0, 4), channels_last=True).randn(3, 2, 2)
    assert noise.is_contiguous(memory_format=torch.channels_last) and not noise.is_contiguous()
    flat = Batch(x, None, torch.Generator(), 4, slice(0, 4), channels_last=True).randn(5)
    assert flat.shape == (4, 5)
    plain = BatchStream(ds, seed=0, micro=4, grad_accum=1, device=CPU).batch(0, 0)
    assert not plain.channels_last and plain.x.is_contiguous()
    default = Batch(x, None, torch.Generator(), 4, slice(0, 4)).randn(3, 2, 2)
    assert default.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_batch_draws_for_the_global_batch_in_the_data_dtype(dtype):
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    b = Batch(torch.zeros(2, 3, dtype=dtype), None, g(), 5, slice(1, 3))
    torch.testing.assert_close(b.randn_like_x(), torch.randn(5, 3, generator=g())[1:3].to(dtype))
    b = Batch(torch.zeros(2, 3), None, g(), 5, slice(1, 3))
    torch.testing.assert_close(b.rand(4), torch.rand(5, 4, generator=g())[1:3])


def test_the_objective_draws_after_the_streams_own_two_rows():
    """The stream takes 2 × micro uniforms (label dropout, flips) first; the objective's numbers follow."""
    s = BatchStream(Numbers(6), seed=1, micro=3, grad_accum=1, device=CPU)
    g = torch.Generator().manual_seed(step_seed(1, 0, 0))
    torch.rand((2, 3), generator=g)
    torch.testing.assert_close(s.batch(0, 0).randn(2), torch.randn(3, 2, generator=g))
