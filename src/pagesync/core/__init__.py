"""The sync core: config, HTTP, pagination, checkpoints and destinations, without Prefect.

Nothing here imports Prefect (a test imports every module with Prefect unimportable), so
the core runs and is tested alone, and could serve another orchestrator. The Prefect
mapping lives in `pagesync.flows`, `pagesync.tasks` and `pagesync.prefect`.
"""
