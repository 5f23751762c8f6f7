"""What the tests share besides fixtures (those are in tests/conftest.py), by topic: `env` (this process's settings
and the environment of the processes the tests start), `engines` (the tiny checkpoints' shapes and engine
settings), `cli` (running `emu3-vllm`), `outputs` (reading what `generate` wrote), `serving` (`emu3-vllm serve`)
and `kill_when` (a watcher process that signals a run).

Importing this package does nothing else: `kill_when` runs as a script from it.
"""
