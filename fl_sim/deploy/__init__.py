"""Real federations: Flower's SuperLink and SuperNodes over gRPC, TLS and node keys.

`fl-sim deploy ...` (fl_sim.deploy.cli) wraps Flower's commands; docs/deployment.md gives
the same steps as plain Flower commands.
"""
