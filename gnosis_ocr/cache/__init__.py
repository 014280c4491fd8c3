"""The shared model cache on a GCS FUSE bucket: one download across all hosts, offline loads.

Light on purpose: the API imports `state` from here without pulling in huggingface_hub.
"""
