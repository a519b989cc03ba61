"""Differential privacy for fl-sim runs (docs/privacy.md): client-level central DP through
Flower's wrappers (central.py), sample-level DP-SGD with Opacus at each client (dpsgd.py),
and the ledger that books the ε both spend and stops a run before it overspends
(ledger.py)."""
