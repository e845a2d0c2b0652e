"""The `image_folder` dataset: your own images with captions (see `builder`)."""
