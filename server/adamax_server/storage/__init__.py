"""Storage: the checkpoint format (``checkpoint``: manifest + safetensors, atomic writes, verification)
and the ``CheckpointManager`` (``checkpointing``: policies, retention, save/restore of a coordinator).
"""
