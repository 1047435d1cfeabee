"""The values of the flags that several modules check, each in one place: spmd.run's click options, RankState's
checks (for options made without click), the planner, spmd.comm and the scripts. Imports nothing."""
ALLREDUCES = ("star", "ring", "mpi")  # --allreduce: how a stage's ranks add up partial sums (spmd.comm runs each,
# the planner costs each)
ACTIVATIONS = ("f32", "int8")  # --activations: the arithmetic on quantised weights
KV_CACHES = ("f32", "f16")  # --kv-cache: what the KV caches hold keys and values in (model.KV_DTYPES: numpy's types)
WEIGHT_SOURCES = ("file", "peer")  # --migrate-weights: where a migration's moved weights come from
