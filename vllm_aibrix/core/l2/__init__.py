"""The second (shared/remote) tier: backends, value codec, store, ingestion."""
