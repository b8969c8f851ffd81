"""Challenge shards: a clear error for each kind of bad file, and a deterministic distributed stream."""
import numpy as np
import pytest

import train_gpt as tg


def write_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())
    return path


def test_reads_tokens_of_a_valid_shard(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [1, 5, 7, 9])
    assert tg.read_shard(str(path), 16).tolist() == [1, 5, 7, 9]


@pytest.mark.parametrize("kwargs,message", [(dict(magic=1234), "not a challenge shard"),
                                            (dict(version=2), "not a challenge shard"),
                                            (dict(count=10), "tokens need")])
def test_bad_header_or_truncated_shard_is_named_in_the_error(tmp_path, kwargs, message):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3], **kwargs)
    with pytest.raises(tg.UserError, match=message) as err:
        tg.read_shard(str(path), 16)
    assert str(path) in str(err.value)


def test_out_of_range_token_names_file_and_vocab(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 300])
    with pytest.raises(tg.UserError, match=r"token id 300 >= VOCAB_SIZE=256") as err:
        tg.read_shard(str(path), 256)
    assert str(path) in str(err.value)


def test_missing_shards_say_how_to_fix_it(tmp_path):
    with pytest.raises(tg.UserError, match="DATA_PATH"):
        tg.shard_files(str(tmp_path), "train")


def test_ranks_read_disjoint_consecutive_slices_of_one_stream(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 50) % 1000)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50, 120) % 1000)
    files = tg.shard_files(str(tmp_path), "train")
    import torch
    loaders = [tg.TrainLoader(files, 1000, r, 2, torch.device("cpu")) for r in range(2)]
    for step in range(3):
        (x0, y0), (x1, y1) = (loader.next_batch(8, 4) for loader in loaders)
        base = step * 18
        assert x0.flatten().tolist() == list(range(base, base + 8))
        assert x1.flatten().tolist() == list(range(base + 9, base + 17))
        assert y1.flatten().tolist() == list(range(base + 10, base + 18))


def test_stream_wraps_around_after_the_last_shard(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3, 4, 5])
    stream = tg.TokenStream([str(tmp_path / "fineweb_train_000000.bin")], 16)
    assert stream.take(7).tolist() == [1, 2, 3, 4, 5, 1, 2]


def test_empty_training_shards_are_an_error_not_a_hang(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [])
    with pytest.raises(tg.UserError, match="hold no tokens"):
        tg.TokenStream([str(path)], 16)
