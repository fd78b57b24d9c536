"""Routing: which task (or mixture of tasks) each sequence of a batch uses.

    route.py      explicit names/ids/mixtures -> a Route (per-sequence or per-token coefficients)
    prototype.py  a router fitted from a few unlabeled examples per task (no training)
    linear.py     a logistic-regression router fitted from labeled examples

Routers see only feature vectors; computing them from a model is qmerge/nn/features.py.
"""

from qmerge.routing.linear import LinearRouter
from qmerge.routing.prototype import PrototypeRouter
from qmerge.routing.route import Route, parse_mixture, resolve
from qmerge.routing.router import ROUTERS, Router

__all__ = [
    "ROUTERS",
    "LinearRouter",
    "PrototypeRouter",
    "Route",
    "Router",
    "parse_mixture",
    "resolve",
]
