"""The stand-in server's package; ``python -m dsnb.serving`` runs ``__main__``."""
