"""Downpour SGD: asynchronous replicas, each split by layer into stages, fetching from and
pushing to a sharded parameter server."""
