"""Flax networks. One way to build a model from a config: `encoder_config` + `Encoder`."""
