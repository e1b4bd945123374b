"""The training token stream: windows across documents and epochs, blending, resumption."""

import numpy as np
import pytest

from tst_megatron.data.stream import BlendedStream, DataError, DocumentStream, MockStream


class FakeIndexedDataset:
    """Documents of given lengths; token t of document d is d * 1000 + t."""

    def __init__(self, lengths):
        self.sequence_lengths = np.asarray(lengths, dtype=np.int32)

    def get(self, idx, offset=0, length=None):
        n = self.sequence_lengths[idx]
        length = n - offset if length is None else length
        return np.arange(offset, offset + length) + idx * 1000


def stream(lengths=(3, 5, 2, 4), seed=0):
    dataset = FakeIndexedDataset(lengths)
    return DocumentStream(dataset, np.arange(len(lengths)), seed=seed, name="fake")


def test_reads_concatenated_shuffled_documents():
    s = stream()
    order = np.random.RandomState(0).permutation(4)
    expected = np.concatenate(
        [np.arange(n) + d * 1000 for d, n in ((d, (3, 5, 2, 4)[d]) for d in order)]
    )
    assert s.tokens_per_epoch == 14
    np.testing.assert_array_equal(s.read(0, 14), expected)
    np.testing.assert_array_equal(s.read(3, 6), expected[3:9])


def test_epoch_wrap_reshuffles():
    s = stream()
    tokens = s.read(10, 8)  # 4 tokens of epoch 0, 4 of epoch 1
    first_doc_of_epoch_2 = np.random.RandomState(1).permutation(4)[0]
    assert tokens[4] == first_doc_of_epoch_2 * 1000


def test_documents_shorter_than_a_window_are_crossed():
    s = stream(lengths=(1, 2, 1, 1, 3))
    assert len(s.read(0, 8)) == 8


def test_blended_stream_windows_overlap_by_one_and_cursors_advance():
    blend = BlendedStream([stream()], [1.0])
    windows = blend.next_windows(3, 5)
    assert windows.shape == (3, 5)
    assert windows[0, -1] == windows[1, 0] and windows[1, -1] == windows[2, 0]
    assert blend.state.cursors == [12] and blend.state.consumed_tokens == 12


def test_rows_read_only_this_ranks_share_but_advance_all():
    a, b = BlendedStream([stream()], [1.0]), BlendedStream([stream()], [1.0])
    full = a.next_windows(4, 3)
    part = b.next_windows(4, 3, rows=slice(2, 4))
    np.testing.assert_array_equal(part, full[2:])
    assert a.state.as_dict() == b.state.as_dict()


def test_blend_follows_weights_and_resumes_from_state():
    weights = [3.0, 1.0]  # normalised to 0.75 / 0.25
    blend = BlendedStream([MockStream(100, 1), MockStream(100, 2)], weights)
    blend.next_windows(8, 4)
    assert blend.state.samples == [6, 2]
    saved = blend.state.as_dict()
    resumed = BlendedStream([MockStream(100, 1), MockStream(100, 2)], weights)
    resumed.load_state(saved)
    np.testing.assert_array_equal(resumed.next_windows(4, 4), blend.next_windows(4, 4))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "2 datasets but 1 blend weights"),
        ([1.0, 0.0], "blend weights must be finite positive numbers"),
    ],
)
def test_bad_blends_are_rejected(weights, message):
    with pytest.raises(DataError, match=message):
        BlendedStream([MockStream(10, 0), MockStream(10, 1)], weights)


def test_resume_with_another_blend_is_rejected():
    blend = BlendedStream([MockStream(10, 0)], [1.0])
    with pytest.raises(DataError, match="has 2 datasets, this run has 1"):
        blend.load_state({"cursors": [0, 0], "samples": [0, 0]})
