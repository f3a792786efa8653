"""Example models for the ``package.module:factory`` path."""
