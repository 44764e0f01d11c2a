"""`pdserve bench`: an OpenAI-API load generator for any OpenAI-compatible server.

datasets builds the requests, client times one streaming request, runner schedules them
(Poisson arrivals and/or a concurrency cap), report turns records into metrics, command is the CLI.
"""
