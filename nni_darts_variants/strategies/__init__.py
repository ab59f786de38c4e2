"""One file per variant, each a subclass of :class:`~nni_darts_variants.strategies.base.DartsVariant`."""
