"""Keys of fl-sim's messages that its client and server both read, beyond Flower's own."""

# SecAgg+ (docs/privacy.md)
WEIGHT_KEY = "secagg-weight"  # train config: the reply metric that weights a client's update
NAMES = "secagg-names"  # reply record: the names of the masked arrays, in order

# loss.class_weights: federation: the run's config carries the federation's class counts
FEDERATION_COUNTS = "federation-class-counts"

# A simulation's own: the folder where each simulated client keeps its test split's
# predictions (fl_sim.predictions). A deployment never sends it, so no byte count holds it.
CLIENT_STORE = "client-store"
SIMULATION_ONLY = (CLIENT_STORE,)
