"""emu3_vllm: BAAI Emu3 on vLLM.

Light at import: vLLM and torch load only when the engine or a checkpoint builder is used. Where code runs:

- `vllm_plugin/`: what vLLM loads in its engine and worker processes (model, processing, pair scheduler, CFG step);
- `offline/`: the offline API (`Emu3`) and the streaming core under every image front end;
- `jobs/`: generation jobs (prompt sources, the image-folder and webdataset sinks, Ray replicas);
- `serving/`: the OpenAI-compatible server's launcher and images route;
- `lmms/`: the lmms-eval models; `shapes/`: the shapes world, demo and trained checkpoint;
- `testing/`: random checkpoints and the transformers reference;
- top level: what every process shares (settings, token layout, prompts, the CFG pair protocol, engine set-up,
  the image loader) and the CLI.
"""

__all__ = ["Emu3", "generate_on_ray", "make_random_checkpoint", "shapes", "shapes_checkpoint"]
__version__ = "0.1.0"

_LAZY = {"Emu3": "emu3_vllm.offline.emu3", "generate_on_ray": "emu3_vllm.jobs.ray_replicas",
         "make_random_checkpoint": "emu3_vllm.testing.checkpoints", "shapes_checkpoint": "emu3_vllm.shapes.trained"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
