"""ndovu-proxy: a local reverse proxy that attaches Ndovu Partner API tokens for legacy apps."""

__version__ = "0.1.0"
