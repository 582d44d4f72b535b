"""What every gRPC server process of aqimodels needs, the registry's and the worker's alike.

The interceptor (request ids, logs, errors to status codes), bearer-token authentication, TLS
binding, Prometheus metrics, the health service, the call's time budget, environment parsing and
the signal-driven shutdown. It depends on the client (the error table and the shared vocabulary)
and on the generated protos, never on ``aqimodels.server`` or ``aqimodels.training``: the worker
imports it without loading the registry.
"""
