"""prepare_data.py reproduces the original repo's data set bit for bit."""

import hashlib

import numpy as np

from distributed import run_script

# SHA-256 of the files the original repo's prepare_data.py writes, measured by
# running it here (numpy 2.4, x86_64). X is pure RNG output and portable; y goes
# through a float32 matmul, whose last bits could differ under another BLAS.
ORIGINAL_SHA256 = {
    "xtrain.npy": "f39058aad54e2d66f2dc50ce43302bea0347d6c1b4c72900e0c46030282a408a",
    "ytrain.npy": "c47863ca1a354647af3c7571f7cca607b12ab481b7f267c766226019603d13da",
    "xvalid.npy": "2813a46eaa940031cd2c70b1a115ea50ee3ccb524579f9f1d1c9d4777dc2bc0a",
    "yvalid.npy": "4288742132d716d8c72309a1c4925236f2242b92597b0597d5093e255faf13b5",
}


def prepare(tmp_path, *args):
    run_script("prepare_data.py", "--data_dir", tmp_path, *args)
    return {name: np.load(tmp_path / name) for name in ORIGINAL_SHA256}


def test_defaults_are_bit_identical_to_the_original(tmp_path):
    prepare(tmp_path)
    for name, digest in ORIGINAL_SHA256.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name


def test_flags(tmp_path):
    d = prepare(tmp_path, "--num_samples", "1000", "--input_size", "8", "--seed", "3",
                "--noise", "0")
    assert d["xtrain.npy"].shape == (900, 8) and d["xvalid.npy"].shape == (100, 8)
    assert d["ytrain.npy"].shape == (900,) and d["ytrain.npy"].dtype == np.float32
    # Noise 0: y is exactly X w, with w the draw that follows X from the same seed.
    rng = np.random.RandomState(3)
    X = rng.randn(1000, 8).astype(np.float32)
    w = rng.randn(8).astype(np.float32)
    assert np.array_equal(d["xtrain.npy"], X[:900])
    assert np.array_equal(d["yvalid.npy"], (X @ w[:, None])[900:, 0])


def test_token_data_for_the_transformer(tmp_path):
    """--model transformer: sequences of seq_length + 1 tokens in [0, vocab) that repeat with
    period 4 after 4 random ones, the same from the same seed, and the regression data untouched."""
    def tokens(directory, *args):
        run_script("prepare_data.py", "--model", "transformer", "--data_dir", directory,
                   "--num_samples", "100", *args)
        return [np.load(directory / name) for name in ("tokens_train.npy", "tokens_valid.npy")]

    train, valid = tokens(tmp_path / "a", "--vocab_size", "10", "--seq_length", "12")
    assert train.shape == (90, 13) and valid.shape == (10, 13) and train.dtype == np.int64
    assert train.min() >= 0 and train.max() == 9
    assert np.array_equal(train[:, 4:], train[:, :-4]), "every token repeats the one 4 back"
    again, _ = tokens(tmp_path / "b", "--vocab_size", "10", "--seq_length", "12")
    other, _ = tokens(tmp_path / "c", "--vocab_size", "10", "--seq_length", "12", "--seed", "8")
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert not (tmp_path / "a" / "xtrain.npy").exists()
