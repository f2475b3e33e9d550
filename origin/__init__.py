"""nearvoice origin: the heavy tier behind the shields. It reuses the edge core and adds the
URL-minting API, a persistent object store, engines on GPU execution providers, and adapters
for external TTS servers."""
