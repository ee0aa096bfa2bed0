"""One module a route's handler (Neuronpedia's inference-server layout); routes.py registers them per atlas."""
