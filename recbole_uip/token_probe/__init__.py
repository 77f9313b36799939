"""The token probe's parts, tested here and run by ``benchmarks/token_probe.py``: what soft tokens fitted per user,
per group of users or by an encoder carry about a user's held-out behaviour through the frozen LLM."""
