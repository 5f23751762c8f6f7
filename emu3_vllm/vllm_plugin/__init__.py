"""What vLLM loads in its engine and worker processes: registration (the `vllm.general_plugins` entry point), the
native model and its processing, the pair-aware scheduler, the CFG step and its V1 and Model Runner V2 adapters,
and `LLM.apply_model` probes. Import-light: vLLM imports this package in every process it starts."""
