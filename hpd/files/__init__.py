"""A run's files and provenance: file modes, the output folder and its lock, content
digests, host RNG state, and the model hub's reachability. Imports nothing else from hpd."""
