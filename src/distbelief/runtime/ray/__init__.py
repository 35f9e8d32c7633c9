"""The Ray runtime: actors as Ray actors on a cluster (runtime), a data plane of direct
connections between hosts (wire), placement of actors on nodes (placement), and a watchdog
that stops a private instance when its driver dies (watchdog)."""
