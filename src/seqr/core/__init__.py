"""Pure routing math: scores, masked argmax, AdapterBank, NormStats, costs, traces, the router registry. No I/O."""
