"""The TensorRT build stage and machine tools; imports ``gpt2_edge.runtime`` freely (never the
other way round: everything needed to *run* an engine is ``gpt2_edge.runtime.trt``).

    builder.py  ``gpt2-edge build-engine``: parse a bundle's graph, build and write an engine
    trt_api.py  the TensorRT builder calls that differ between versions
    system.py   what this machine has (driver, CUDA, ONNX Runtime, Jetson, CPU), for doctor
    doctor.py   ``gpt2-edge doctor``: those facts and the bundle and provider to use here
    cli.py      the argparse layers of both commands
"""
