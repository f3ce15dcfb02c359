"""Logical axis names shared by every model family.

Models annotate parameters and activations with these names; `train/partitioning.py` maps
them onto the ('data', 'fsdp', 'tensor') mesh. Activations get their own names so that e.g.
a batch sharded over 'fsdp' never collides with an embedding dimension sharded over the same
mesh axis.
"""

# Activations.
BATCH = 'act_batch'
LENGTH = 'act_length'
ACT_EMBED = 'act_embed'
ACT_HEADS = 'act_heads'
ACT_MLP = 'act_mlp'

# Parameters.
VOCAB = 'vocab'
EMBED = 'embed'
HEADS = 'heads'
MLP = 'mlp'
POSITION = 'position'
CLASSES = 'classes'
