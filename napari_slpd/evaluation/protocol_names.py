"""The evaluation protocols by name, in the report's order: what the CLI offers, the panel lists and the engine
runs (a module of its own so that naming them loads none of them)."""

PROTOCOLS = ("knn", "linear", "abmil", "cox", "retrieval")
