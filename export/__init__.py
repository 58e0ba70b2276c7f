"""lipdet.export: fold Lipschitz parametrizations into plain weights, write ONNX (fp32/fp16/int8) and TensorRT plans."""
