"""The service: batching engine, OpenAI-compatible HTTP app, auth, metrics, audit, Ray Serve."""
