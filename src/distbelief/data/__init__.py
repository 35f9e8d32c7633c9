"""What a run trains on: in-memory tensors, the bundled datasets and how examples are split
over replicas (inputs), and data files (files)."""
