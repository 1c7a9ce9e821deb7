"""`macft serve`: one base in memory, every run's adapters resident on it, an OpenAI-compatible
API that picks the adapter per request: catalog (what is served), engine (the generation
worker and its continuous batch), api (OpenAI's requests and answers), server (HTTP)."""
