"""Multi-process serving: ``hub serve --workers N`` runs a supervisor (``workers.supervisor``)
and N worker processes (``workers.worker``) that share one port through ``SO_REUSEPORT``."""
