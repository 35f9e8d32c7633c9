"""Pure math every algorithm builds on: flat parameter vectors (flat), the layout of a model
over stages and shards (layout, partition) and the shards' update rules (optim)."""
