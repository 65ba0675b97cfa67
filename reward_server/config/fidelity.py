"""The rule a quantized model's rewards must pass against the unquantized (or float32) model's on a sample, judged
on the order of the sequences (what RL uses): Spearman's rank correlation at least QUANTIZED_SPEARMAN and the share
of pairs ordered alike at least QUANTIZED_PAIRS, on every label. Defined once: the defaults of
model.quantization_min_spearman / model.quantization_min_pairs (the start-up fidelity gate,
reward_server/loading/fidelity_gate.py) and the pass rule of `python -m reward_server.check --quantized`.

For noise-like differences the pairs bar is the stricter one: rewards y = x + e with Gaussian e give Spearman 0.999
with 98.6 % of pairs ordered alike, and 99.5 % of pairs needs Spearman of about 0.9999."""

QUANTIZED_SPEARMAN = 0.999
QUANTIZED_PAIRS = 0.995
