"""Average the weights of a run's last epochs (stochastic weight averaging, offline).

The validation AUROC of one epoch moves by a few hundredths from epoch to epoch on a
few hundred studies; the mean of the weights of the last epochs of a decaying
learning-rate schedule is a flatter, steadier point than any one of them (Izmailov
et al., 2018).  Every weight is averaged, the batch-norm moving statistics included:
the epochs averaged are neighbours at a small learning rate, so their statistics
agree closely.

``python -m models.training.average --out RUN/model.keras RUN/epoch-7.keras ...``
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def average_checkpoints(paths: Sequence[Path]) -> Any:
    """The training model of ``paths[0]`` carrying the mean of all the checkpoints' weights."""
    import keras

    from models.training.train import spatial_cross_entropy

    if not paths:
        raise ValueError("no checkpoints to average")
    models = [keras.models.load_model(p, safe_mode=True, compile=False,
                                      custom_objects={"spatial_cross_entropy": spatial_cross_entropy})
              for p in paths]
    weights = [m.get_weights() for m in models]
    if any(len(w) != len(weights[0]) for w in weights):
        raise ValueError("checkpoints do not have the same architecture")
    mean = [np.mean([w[i] for w in weights], axis=0).astype(weights[0][i].dtype) for i in range(len(weights[0]))]
    models[0].set_weights(mean)
    logger.info("averaged %d checkpoints: %s", len(paths), ", ".join(p.name for p in paths))
    return models[0]


def main(argv: list[str] | None = None) -> int:
    """Write the inference model (logits, feature map) of the averaged checkpoints."""
    from models.training.train import inference_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="model.keras to write")
    p.add_argument("checkpoints", type=Path, nargs="+", help="training checkpoints (.keras)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inference_model(average_checkpoints(args.checkpoints)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
