"""``gpt2-edge serve``: an OpenAI-style HTTP server with continuous batching, on uvicorn or as Ray
Serve replicas. Torch-free. By concern, as vLLM's OpenAI entry point:

    settings.py     ServeSettings: every option, checked when made; its one table of options
                    generates the CLI's options, the restart argv and Ray's `serve run` arguments
    protocol.py     typed request bodies (the sampling fields once, for completions and chat),
                    their GenerationConfig, typed responses, OpenAI's error shape
    model.py        load_served_model: the runtime Model (runtime.load_model) the settings ask for
    engine.py       the engine thread and its submitting side (reserve, submit, score): each step
                    the scheduler plans, the executor runs, the output processor reports
    scheduler.py    decides: a StepPlan from the queue, the slots and the KV budget (admissions,
                    prompt chunks, the decode batch, a prompt scoring job); runs nothing
    executor.py     runs a plan on the backend and the cache: prefill, extend, decode or a
                    speculative step (verify, roll back), prompt scoring
    output.py       step results -> TokenEvents: log-probabilities, text pieces, stop strings, metrics
    sequences.py    the engine's data: Slot (one sequence's whole state where it runs),
                    SequenceHandle, TokenEvent, Reservation, the two refusals
    admission.py    the KV memory: admission within the budget, the cache growing and shrinking,
                    the prefix cache
    prompts.py      a request's prompts checked and tokenized
    completions.py  one completion request's life with the engine: room, prompt scoring, sequences,
                    the answer collected or streamed, cancellation
    render.py       the answer's shape: completion or chat, logprobs, usage, chunks
    chat.py         chat templates; a chat request is a Completion rendered as chat
    tokens.py       /tokenize, /detokenize, /tokenizer_info
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
