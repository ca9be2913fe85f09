"""Engine-agnostic cache core. Nothing under this package imports vLLM."""
