"""One module a route (Neuronpedia's inference-server layout)."""
