"""``gpt2-edge serve``: an OpenAI-style HTTP server with continuous batching, on uvicorn or as Ray
Serve replicas. Torch-free. By concern, as vLLM's OpenAI entry point:

    settings.py     ServeSettings: every option, checked when made (the CLI and Ray alike)
    protocol.py     request bodies, their GenerationConfig, OpenAI's error shape
    model.py        load_served_model: the runtime Model (runtime.load_model) the settings ask for
    scheduler.py    continuous batching over KV-cache slots, chunked prefill
    sequences.py    what a request hands the scheduler: SequenceHandle, TokenEvent, Reservation
    admission.py    the KV memory: admission within the budget, the cache growing and shrinking,
                    the prefix cache
    completions.py  one /v1/completions request: sequences, SSE, echo and logprobs, usage
    app.py          the routes and the app factory (create_app)
    middleware.py   request counter (and last-resort 500), Host check, JSON-only bodies, API key,
                    body size and time limits
    connections.py  the socket bound before the model loads; uvicorn's h11 protocol with a header
                    timeout and a connection cap
    metrics.py      the Prometheus metrics
    cli.py          ``gpt2-edge serve`` / ``python -m gpt2_edge.serve`` on uvicorn
    ray_app.py      the same app as a Ray Serve deployment

Importing this package (the main CLI does, to build its parser) loads none of the HTTP stack.
"""
