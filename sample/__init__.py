"""The `sample` command: prompts in, image grids out."""
