"""AWS adapters: configuration and clients, the ingest and search Lambdas' cores, the batch-transform backfill."""
