"""meshplan profiler: measures a cluster under torchrun and writes cluster.yaml."""
