"""The user-facing layer: the ``register_pair`` API, ``register-many``, ``compare`` and the ``nir`` command line."""
