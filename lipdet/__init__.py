"""lipdet: train, export and attack Lipschitz-constrained object detectors.

Stages live in subpackages: ``lipdet.train``, ``lipdet.export``, ``lipdet.deploy``,
``lipdet.eval``; shared pieces (data, models, boxes, artifacts, CLI) live here.
"""

__version__ = "0.1.0"
