"""The leaf package's user-input error (it cannot import `dalle_jax.errors`)."""


class VQVAEInputError(ValueError):
    """Input of the wrong shape/dtype/config; the message names what was expected."""
