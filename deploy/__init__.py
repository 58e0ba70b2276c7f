"""lipdet.deploy: one runtime interface over torch, ONNX Runtime and TensorRT, plus the differentiable twin."""
