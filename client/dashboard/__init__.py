"""The web dashboard (``aqimodels dashboard``): an ASGI app over the public ModelRegistry API.

It talks to the registry like any other client (grpc.aio, the same error table, each browser's
token), bridges WatchRetrainJob and WatchAlerts to browsers as Server-Sent Events with one
registry stream per job and per alert feed however many browsers follow them, and ships its own
templates, CSS, JavaScript and chart library (nothing is loaded from outside the machine).
Needs the ``dashboard`` extra: ``pip install 'aqimodels[dashboard]'``.
"""
