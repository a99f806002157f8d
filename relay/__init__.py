"""The Direct Line relay: channel webhooks and Web Chat pages to a Bot Framework bot, statelessly."""

__all__ = ["__version__"]

__version__ = "0.1.0"
