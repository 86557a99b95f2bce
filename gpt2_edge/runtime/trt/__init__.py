"""Running prebuilt TensorRT engines, torch-free: everything the runtime needs to use an engine
that ``gpt2_edge.engine`` (the build stage) made. Nothing here imports ``gpt2_edge.engine``, and
nothing here imports ``tensorrt`` or cuda-python at module level: they load when a backend is made.

    errors.py   EngineError: an engine cannot be built or used here
    api.py      the TensorRT run-time calls that differ between versions (import, logger, I/O)
    cuda.py     the CUDA runtime calls, through cuda-python, behind one checked class
    system.py   which GPU and which TensorRT this process sees (engine and cache keys)
    shapes.py   the shape ranges engines and ONNX Runtime's TensorRT provider are given
    plan.py     the engine directory: engine.json, its compatibility checks, finding one
    description.py  EngineDescription: a loaded engine's I/O, dims, profiles and limits, frozen
    lanes.py    an engine's lanes (execution context + stream) and the pool that hands them out
    runner.py   one KV cache's lane and device buffers (EngineRunner); reads only the two above
    backend.py  the engine backend (TrtEngineBackend): loads and checks an engine, makes runners
"""
