"""The stand-in runtime package; only its ``server`` is played."""
