"""ml_collections configs: each module has `get_config(preset)` with named presets.

The repository root has a `configs` link to this folder, so
`--config=configs/pretrain.py:demo` works from a checkout, and the same files travel
inside the installed package.
"""
