"""The commit path: part writers, the Delta tables (the one ledger of what is committed), the lease that
keeps one writer per OUTPUT. Tagging writes through it; retrieval and the service read through it."""
