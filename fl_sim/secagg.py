"""What a SecAgg+ client and server agree on beyond Flower's protocol (docs/privacy.md)."""

WEIGHT_KEY = "secagg-weight"  # train config: the reply metric that weights a client's update
NAMES = "secagg-names"  # reply record: the names of the masked arrays, in order
