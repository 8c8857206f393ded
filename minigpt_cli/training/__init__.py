"""The training side: the loop, data, optimizers, ranks, shards, resume state."""
