"""Write the synthetic regression data set: y = X w + noise.

With the defaults the files are bit-identical to the original repo's: the
same numpy calls in the same order from seed 7 (X, then w, then the noise,
drawn in float64 and added before the cast to float32).
"""

import argparse
import os

import numpy as np

FILES = ("xtrain.npy", "ytrain.npy", "xvalid.npy", "yvalid.npy")
TRAIN_FRACTION = 0.9


def make_data(num_samples=20000, input_size=64, seed=7, noise=0.001):
    np.random.seed(seed)
    X = np.random.randn(num_samples, input_size).astype(np.float32)
    w = np.random.randn(input_size).astype(np.float32)
    y = np.matmul(X, w[:, np.newaxis])[:, 0] + np.random.randn(num_samples) * noise
    y = y.astype(np.float32)
    n_train = int(TRAIN_FRACTION * num_samples)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def save_data(arrays, data_dir):
    """Write make_data's four arrays as FILES in data_dir."""
    os.makedirs(data_dir, exist_ok=True)
    for name, array in zip(FILES, arrays):
        path = os.path.join(data_dir, name)
        tmp = path + ".tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, path)  # never leave a half-written file under the real name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--num_samples", type=int, default=20000)
    parser.add_argument("--input_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--noise", type=float, default=0.001,
                        help="std of the Gaussian label noise")
    args = parser.parse_args()
    if args.num_samples < 10 or args.input_size < 1:
        parser.error("--num_samples must be at least 10 and --input_size at least 1")

    arrays = make_data(args.num_samples, args.input_size, args.seed, args.noise)
    save_data(arrays, args.data_dir)
    print(f"wrote {len(arrays[0])} train and {len(arrays[2])} valid samples of size "
          f"{args.input_size} to {args.data_dir}/")


if __name__ == "__main__":
    main()
