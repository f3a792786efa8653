"""Train the digits ResNet example (scikit-learn digits, 32x32) and cache its weights.

    python scripts/train_digits_cnn.py [--epochs 12] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from spdy.examples import digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {digits.cache_path()}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    model = digits.train(epochs=args.epochs, path=args.out)
    print(f"trained in {time.perf_counter() - t0:.1f} s; held-out accuracy {digits.heldout(model)['accuracy']:.4f}")
    print(f"saved to {args.out or digits.cache_path()}")


if __name__ == "__main__":
    main()
