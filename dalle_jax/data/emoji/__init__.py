"""The `emoji` dataset: Noto, Twemoji and OpenMoji emoji with CLDR names (see `builder`)."""
