"""What a run trains on: in-memory tensors (tensors), what train() accepts as data (inputs),
the bundled datasets (datasets), how examples are split over replicas (sharding), and data
files (files: one module per format)."""
