"""The workflow's side of noisynn: checking a config (its schema, datasets and models), expanding its
grid, the code digest of each step, and the cost of a config's evaluations before they run."""
