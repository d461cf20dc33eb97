"""Write adaptsim's own MNIST-5k train/test split to an ``.npz`` the official codebases can read.

Both sides of a side-by-side comparison (adaptsim and the official SEMA-CL / AAAI25-MOS /
LAMDA-PILOT code) must see the same images. adaptsim's ``mnist5k`` dataset splits each class into
400 train / 100 test images with ``scenario.dataset.seed``; this script saves exactly that split,
so the official side's dataset class loads ``x_train, y_train, x_test, y_test`` (uint8, N×28×28,
int64 labels) and adaptsim runs its ``mnist5k`` dataset with the same seed.

    python scripts/shared_split.py --seed 0 --out /tmp/mnist5k_seed0.npz
"""

from __future__ import annotations

import argparse

import numpy as np

from adaptsim.cl.data import DatasetConfig, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="scenario.dataset.seed of the adaptsim side")
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args()
    train, test = load_dataset(DatasetConfig(name="mnist5k", seed=args.seed))
    np.savez_compressed(
        args.out,
        x_train=train.x[:, 0].numpy(), y_train=train.y.numpy(),
        x_test=test.x[:, 0].numpy(), y_test=test.y.numpy(),
    )
    print(f"wrote {args.out}: {len(train)} train / {len(test)} test images (dataset seed {args.seed})")


if __name__ == "__main__":
    main()
