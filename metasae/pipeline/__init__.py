"""`metasae build` as a pipeline: model and corpus -> activations -> ladder -> evaluation -> stitching ->
statistics -> meta-SAE -> atlas.

- `config.py`: `BuildConfig`, one typed section per part of the pipeline (and the old flat form, read back)
- `presets.py`: the named configs (`tiny`, `demo`, `gpt2-paper`) and the command line that reproduces one
- `context.py`: `BuildContext`, what the stages share (model, activations, SAEs loaded once)
- `stages.py`: the stage functions and `STAGES`, their order, outputs and the settings each depends on
- `assemble.py`: the last stage, the atlas folder
- `run.py`: `build()`: the lock, invalidating stale stages, running `STAGES` in order
"""
