"""Input pipeline: sources, preprocessing ops, grain pipelines, built-in dataset."""
