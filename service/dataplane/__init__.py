"""Data plane: protocol-agnostic request handling between the adapters and the engine.

- :mod:`service.dataplane.evaluate`: stateless evaluation (validate → engine → response);
- :mod:`service.dataplane.runs`: evaluation runs (batches merged into exact aggregates);
- :mod:`service.dataplane.admission`: the bound on requests in flight.
"""
