"""Run folders on disk: the model card (model.json), checkpoints (safetensors + SHA-256), atomic writes and
load_model."""
