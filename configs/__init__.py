"""ml_collections config files: one get_config() per setting (see README)."""
