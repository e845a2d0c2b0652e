"""shapes_world: procedural colored shapes with captions and a compositional hold-out.

`spec` defines scenes and captions, `render` draws them, `builder` is the tfds builder
(`ShapesWorld`, imported on demand because it pulls in tensorflow_datasets).
"""
