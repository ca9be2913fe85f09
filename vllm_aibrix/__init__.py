"""vllm_aibrix: tiered KV-cache offloading (L1 CPU memory + shared L2) for vLLM."""

__version__ = "0.1.0"
