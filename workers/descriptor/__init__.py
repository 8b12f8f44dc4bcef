"""dlib's face descriptor network without dlib: our reader of its .dat file, the ONNX graph, the runner.

    >>> from workers.descriptor import OnnxDescriptor
    >>> net = OnnxDescriptor.load(dat_path, sha256_of_dat)
    >>> vectors, views = net.compute(chips)      # (N, 150, 150, 3) uint8 -> (N, 128), {name: (N, d)}

dat.py reads the file (every byte), graph.py builds the ONNX graph with the attribute views as extra
outputs, runner.py caches the built graph and runs it in onnxruntime.
"""
from workers.descriptor.runner import VIEW_NAMES, OnnxDescriptor, model_cache_dir

__all__ = ["OnnxDescriptor", "VIEW_NAMES", "model_cache_dir"]
