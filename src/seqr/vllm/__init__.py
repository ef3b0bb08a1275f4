"""seqr inside vLLM: the plugin vLLM loads (plugin.py), seqr's routed model and its worker extension (model.py),
per-token routing in vLLM's packed layers (routing.py), allowed sets as columns each request carries (sets.py), and
request-level routing (request.py). Above core, store and hf; below serve, whose engine
(serve/vllm_engine.py) drives vLLM with them. Importing this package imports no vLLM."""
