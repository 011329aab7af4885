"""The stand-in server's package; ``python -m dsnb.runtime.server`` runs ``__main__``."""
