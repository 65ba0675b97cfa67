"""Loading a checkpoint: the checks it must pass, the model on every rank, quantization, the embedded default."""
