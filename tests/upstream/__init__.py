"""Upstream regression: our vLLM patches and scheduler contract against every supported release."""
