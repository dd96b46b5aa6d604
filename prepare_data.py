"""Write the synthetic data: the regression set y = X w + noise, or (--model transformer) tokens.

With the defaults the regression files are bit-identical to the original
repo's: the same numpy calls in the same order from seed 7 (X, then w, then
the noise, drawn in float64 and added before the cast to float32).

The token set (for the toy transformer) is next-token prediction on
sequences that repeat with a period of PERIOD tokens (--period): the first PERIOD are
random, every later token equals the one PERIOD positions back. Predicting
it takes attention to a token several positions back; the first PERIOD - 1
targets cannot be predicted, so the loss falls from log(vocab) towards
(PERIOD - 1) / seq_length x log(vocab). Context parallelism's tests take --period 5
(tests/conftest.py): runs of 4 or 8 tokens put in the wrong place, their positions with them,
would hold the same tokens under period 4, and no loss would tell.
"""

import math
import os

import numpy as np

FILES = ("xtrain.npy", "ytrain.npy", "xvalid.npy", "yvalid.npy")
TOKEN_FILES = ("tokens_train.npy", "tokens_valid.npy")
TRAIN_FRACTION = 0.9
PERIOD = 4


def make_data(num_samples=20000, input_size=64, seed=7, noise=0.001):
    np.random.seed(seed)
    X = np.random.randn(num_samples, input_size).astype(np.float32)
    w = np.random.randn(input_size).astype(np.float32)
    y = np.matmul(X, w[:, np.newaxis])[:, 0] + np.random.randn(num_samples) * noise
    y = y.astype(np.float32)
    n_train = int(TRAIN_FRACTION * num_samples)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def make_tokens(num_sequences=20000, seq_length=16, vocab_size=50, seed=7, period=PERIOD):
    """(train, valid) int64 arrays of sequences of seq_length + 1 tokens: inputs and next tokens."""
    rng = np.random.default_rng(seed)
    key = rng.integers(vocab_size, size=(num_sequences, period))
    tokens = np.tile(key, -(-(seq_length + 1) // period))[:, :seq_length + 1]
    n_train = int(TRAIN_FRACTION * num_sequences)
    return tokens[:n_train], tokens[n_train:]


def save_data(arrays, data_dir, names=FILES):
    """Write make_data's four arrays as FILES (or make_tokens' two as TOKEN_FILES) in data_dir."""
    os.makedirs(data_dir, exist_ok=True)
    for name, array in zip(names, arrays):
        path = os.path.join(data_dir, name)
        tmp = path + ".tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, path)  # never leave a half-written file under the real name


def main():
    from training.operations import (  # here: importing it takes torch's time
        ArgumentParser,
        check_output,
    )
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["toy", "transformer"], default="toy")
    parser.add_argument("--data_dir", default=None,
                        help="default: data, or data_transformer for --model transformer")
    parser.add_argument("--num_samples", type=int, default=20000)
    parser.add_argument("--input_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--noise", type=float, default=0.001,
                        help="std of the Gaussian label noise")
    parser.add_argument("--vocab_size", type=int, default=50, help="tokens (--model transformer)")
    parser.add_argument("--seq_length", type=int, default=16, help="tokens per sequence (ditto)")
    parser.add_argument("--period", type=int, default=PERIOD,
                        help="the sequences repeat every PERIOD tokens (ditto)")
    args = parser.parse_args()
    data_dir = args.data_dir or ("data_transformer" if args.model == "transformer" else "data")
    check_output(parser, "--data_dir", data_dir, "dir")
    if args.num_samples < 10 or args.input_size < 1:
        parser.error("--num_samples must be at least 10 and --input_size at least 1")
    if not (args.noise >= 0 and math.isfinite(args.noise)):
        parser.error(f"--noise must be a number at least 0, got {args.noise}")
    if args.model == "transformer":
        if args.vocab_size < 2 or not 1 <= args.period <= args.seq_length:
            parser.error(f"--vocab_size must be at least 2 and --period from 1 to --seq_length "
                         f"{args.seq_length}")
        train, valid = make_tokens(args.num_samples, args.seq_length, args.vocab_size, args.seed,
                                   args.period)
        save_data((train, valid), data_dir, TOKEN_FILES)
        print(f"wrote {len(train)} train and {len(valid)} valid sequences of "
              f"{args.seq_length} + 1 tokens (vocabulary {args.vocab_size}) to {data_dir}/")
        return
    arrays = make_data(args.num_samples, args.input_size, args.seed, args.noise)
    save_data(arrays, data_dir)
    print(f"wrote {len(arrays[0])} train and {len(arrays[2])} valid samples of size "
          f"{args.input_size} to {data_dir}/")


if __name__ == "__main__":
    main()
