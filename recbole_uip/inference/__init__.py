"""Profile inference: the frozen LLM, the prompt and its block mask, soft tokens, codebooks and the EM trainer."""
