"""The OpenAI-compatible API server's process: `emu3-vllm serve` and the `/v1/images/generations` endpoint plugin."""
