"""seqr inside transformers: attach/detach/routing, model loading, batched generation, choice log-likelihoods."""
