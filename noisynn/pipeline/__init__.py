"""The workflow's side of noisynn: checking a config, expanding its grid, the code digest of each
step, and the cost of a config's evaluations before they run."""
