"""Everything of pagesync that talks to Prefect besides its flows and tasks: the settings
pagesync asks of Prefect, the kept local server, and the deployments of a config.

The core (`pagesync.core`) imports nothing from here.
"""
