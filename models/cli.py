"""Entry points the node's CLI dispatches to (``fracture-node train|evaluate ...``).

Imports of TensorFlow and of :mod:`models.training` happen inside the functions, so
``fracture-node --help`` stays fast and the runtime never imports training code.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def train_main(argv: list[str] | None = None) -> int:
    """``fracture-node train --task router|classifier --data DIR --out RUN [...]``."""
    from models.training import train

    return train.main(argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    """``fracture-node evaluate --data DIR --out DIR [--registry --router --classifier --split]``."""
    from models.training import evaluate

    return evaluate.main(argv)


def export_main(argv: list[str] | None = None) -> int:
    """``fracture-node export [--registry R] [--name NAME ...]``: (re-)export registered models."""
    from models.training import export

    return export.main(argv)
