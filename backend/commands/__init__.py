"""The daemon's commands: ``facecloak serve`` and ``facecloak pair``."""
