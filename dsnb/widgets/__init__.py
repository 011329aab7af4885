"""Notebook views: the live job panel, the cluster view and the launch form.

They are views over :mod:`dsnb.monitor` and the public ``Cluster``/``Job`` API only, and need
the ``notebook`` extra (``pip install 'dsnb[notebook]'``). Importing this package does not
import ipywidgets; the modules that need it do.
"""
